"""Options of the hf backend (`sampling.options`), kept free of torch so the config can check them at load."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from stableopd.errors import UserError


class HFOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    batch_size: int = Field(default=16, ge=1, le=2**31 - 1)


def parse_options(options: dict[str, Any]) -> HFOptions:
    try:
        return HFOptions(**options)
    except ValidationError as err:
        e = err.errors()[0]
        loc = ".".join(map(str, e["loc"]))
        if e["type"] == "extra_forbidden":
            raise UserError(f"unknown hf option 'sampling.options.{loc}'; valid: "
                            f"{', '.join(HFOptions.model_fields)}") from None
        raise UserError(f"sampling.options.{loc}: {e['msg']} (got {e.get('input')!r})") from None
