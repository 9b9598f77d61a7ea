"""Options of the hf backend (`sampling.options`), kept free of torch so the config can check them at load."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from stableopd.backends import base


class HFOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    batch_size: int = Field(default=16, ge=1, le=2**31 - 1)


def parse_options(options: dict[str, Any]) -> HFOptions:
    return base.parse_options(HFOptions, "hf", options)
