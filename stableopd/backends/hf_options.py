"""Options of the hf backend (`sampling.options`), kept free of torch so the config can check them at load."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from stableopd.backends import base


class HFOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    batch_size: int = Field(default=16, ge=1, le=2**31 - 1)
    # generate's KV cache: "static" preallocates prompt + max_new_tokens positions per row instead of growing
    cache: Literal["dynamic", "static"] = "dynamic"
    # torch.compile generate's decode step (needs cache "static"); the first call compiles
    compile: bool = False

    @model_validator(mode="after")
    def _compile_needs_static(self) -> HFOptions:
        if self.compile and self.cache != "static":
            raise ValueError(
                "compile: true needs cache: static (a growing cache changes shape at every token)"
            )
        return self


def parse_options(options: dict[str, Any]) -> HFOptions:
    return base.parse_options(HFOptions, "hf", options)
