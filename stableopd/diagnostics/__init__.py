"""Reading a run's per-step series, diagnosing inflation and collapse, rendering reports and comparisons."""
