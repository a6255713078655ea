"""Command options as validated models: each default defined once, CLI and YAML build the same thing.

Every command that takes more than a handful of options declares one pydantic model (a subclass of
`Options`). The CLI passes only the flags the user actually gave (typer options default to None),
a config file gives a mapping, and `build_options` merges them:

    CLI flag  >  config file  >  the model's own default

Unknown keys and bad values become one `TabpError` line naming the key and the source, so a typo in
a YAML file is reported like a typo on the command line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from tabp_vllm.errors import TabpError, first_line

O = TypeVar("O", bound="Options")


class Options(BaseModel):
    """Base of every command's options: unknown keys are errors, values are validated on set."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @classmethod
    def default(cls, name: str) -> Any:
        """The one default of field `name` (for CLI help texts that show it)."""
        return cls.model_fields[name].get_default(call_default_factory=True)


def _one_line(exc: ValidationError, source: str) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err.get("loc", ())) or "(top level)"
    if err.get("type") == "extra_forbidden":
        return f"{source}: unknown option {where!r}"
    if err.get("type") == "missing":
        return f"{source}: missing option {where!r}"
    got = err.get("input")
    shown = "" if isinstance(got, (dict, list)) else f" (got {got!r})"
    return f"{source}: option {where!r}: {err.get('msg', 'invalid')}{shown}"


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The top-level mapping of a YAML (or JSON) config file; one error line if it is not one."""
    import yaml

    p = Path(path).expanduser()
    if not p.is_file():
        raise TabpError(f"{p}: config file not found")
    try:
        doc = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise TabpError(f"{p}: invalid YAML ({first_line(exc)})") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise TabpError(f"{p}: expected a mapping at the top level")
    return doc


def build_options(cls: type[O], cli: Mapping[str, Any] | None = None,
                  file: str | Path | None = None, *, file_doc: Mapping[str, Any] | None = None) -> O:
    """`cls` from its defaults, then the config file (`file` path or an already read `file_doc`),
    then the CLI flags that were given (None means "not given")."""
    doc = dict(file_doc) if file_doc is not None else (read_config_file(file) if file else {})
    given = {k: v for k, v in (cli or {}).items() if v is not None}
    try:
        return cls.model_validate({**doc, **given})
    except ValidationError as exc:
        loc = exc.errors()[0].get("loc", ())
        from_cli = bool(loc) and loc[0] in given
        source = "command line" if from_cli or not (file or file_doc) else str(file or "config")
        raise TabpError(_one_line(exc, source)) from None
