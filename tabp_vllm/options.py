"""Command options as validated models: each default defined once, CLI and YAML build the same thing.

Every command that takes more than a handful of options declares one pydantic model (a subclass of
`Options`). The CLI passes only the flags the user actually gave (typer options default to None),
a config file gives a mapping, and `build_options` merges them:

    CLI flag  >  config file  >  the model's own default

Unknown keys and bad values become one `TabpError` line naming the key and the source, so a typo in
a YAML file is reported like a typo on the command line.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from pathlib import Path
from types import UnionType
from typing import Any, Callable, List, Literal, Mapping, Optional, TypeVar, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from tabp_vllm.errors import TabpError, first_line

O = TypeVar("O", bound="Options")


class Options(BaseModel):
    """Base of every command's options: unknown keys are errors, values are validated on set."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @classmethod
    def default(cls, name: str) -> Any:
        """The one default of field `name` (for CLI help texts that show it)."""
        return cls.model_fields[name].get_default(call_default_factory=True)


def _one_line(exc: ValidationError, source: str, cls: type[BaseModel] | None = None) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err.get("loc", ())) or "(top level)"
    # from the command line: also name the flag the user typed, beside the config-file key
    flag = flag_of(cls, err.get("loc", ())) if cls is not None else None
    typed = f" (flag {flag})" if flag else ""
    if err.get("type") == "extra_forbidden":
        return f"{source}: unknown option {where!r}"
    if err.get("type") == "missing":
        return f"{source}: missing option {where!r}"
    got = err.get("input")
    shown = "" if isinstance(got, (dict, list)) else f" (got {got!r})"
    return f"{source}: option {where!r}: {err.get('msg', 'invalid')}{shown}{typed}"


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
        raise TabpError(_one_line(exc, source, cls if from_cli else None)) from None


# ---- the command line, generated from the model --------------------------------------------------
#
# Each field of an options model is one CLI flag: `--field-name` (bools `--field-name/--no-...`),
# its help the field's `description`, the default shown the field's own. `option(...)` is `Field`
# with the CLI's extras (other flag names, a default text for None, an environment variable); a
# field that has no flag (a list of mappings, a dict: config-file only) says so with `cli=False`.
# A nested options model (serve's `engine`) is flattened: its fields are top-level flags.
# `options_command` turns `fn(o, ...)` into the typer command whose flags are the model's fields,
# and hands `fn` the validated options (CLI flag > --config file > default), as vLLM's
# `EngineArgs.add_cli_args` derives every flag from its dataclass.

REQUIRED = PydanticUndefined  # `option(REQUIRED, "help", ...)`: a field with no default

CONFIG_HELP = ("YAML file of these options (keys as the option names with '_' for '-'); "
               "flags given win.")


def option(default: Any = REQUIRED, help: str = "", *flags: str, shown: str | None = None,
           envvar: str | None = None, cli: bool = True, cli_type: Any = None, **field: Any) -> Any:
    """A model field and its flag: `help` the help text, `flags` its names when not `--field-name`
    (`"--eager/--no-eager"`, `"-o", "--output"`), `shown` the default as the help names it when the
    value alone does not say it (None meaning "the engine's"), `cli_type` the flag's type when it
    is not the field's (`levels` is "1,4,16" on the command line), `cli=False` no flag at all."""
    extra = {"flags": list(flags), "shown": shown, "envvar": envvar, "cli": cli, "cli_type": cli_type}
    return Field(default, description=help or None, json_schema_extra={"cli": extra}, **field)


@dataclass(frozen=True)
class CliFlag:
    """One field of an options model as a typer option."""

    path: tuple[str, ...]     # ("engine", "max_model_len"): where the value goes in the model
    annotation: Any           # the typer parameter's type (Optional: None is "not given")
    info: Any                 # the typer.Option

    @property
    def name(self) -> str:
        return self.path[-1]


def _strip_optional(tp: Any) -> Any:
    args = [a for a in get_args(tp) if a is not type(None)]
    if get_origin(tp) in (Union, UnionType) and len(args) == 1:
        return args[0]
    return tp


def _is_options_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, Options)


def shown_default(field: FieldInfo) -> str:
    """A field's default as the help shows it: the `shown` text, else the value itself."""
    extra = _cli_extra(field)
    if extra.get("shown"):
        return extra["shown"]
    if field.is_required():
        return "required, here or in --config"
    value = field.get_default(call_default_factory=True)
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value) or "none"
    return str(value)


def _cli_extra(field: FieldInfo) -> dict[str, Any]:
    extra = field.json_schema_extra
    return dict(extra.get("cli", {})) if isinstance(extra, dict) else {}


def flag_of(cls: type[BaseModel], loc: tuple[Any, ...]) -> str | None:
    """The command-line flag of the field at `loc` (nested options models are flattened, as
    `cli_flags` does), or None where no flag sets it (a list entry, a config-file-only field)."""
    field = None
    for key in loc:
        if not (isinstance(key, str) and isinstance(cls, type) and key in getattr(cls, "model_fields", {})):
            return None
        field = cls.model_fields[key]
        cls = _strip_optional(field.annotation)
    if field is None or _is_options_model(cls) or not _cli_extra(field).get("cli", True):
        return None
    decls = _cli_extra(field).get("flags") or ["--" + str(loc[-1]).replace("_", "-")]
    long = [d.split("/")[0] for d in decls if d.startswith("--")]
    return long[0] if long else decls[0]


def cli_flags(cls: type[Options], path: tuple[str, ...] = ()) -> list[CliFlag]:
    """Every flag of `cls`, nested options models flattened into top-level flags."""
    import typer

    flags: list[CliFlag] = []
    for name, field in cls.model_fields.items():
        extra = _cli_extra(field)
        if not extra.get("cli", True):
            continue
        tp = _strip_optional(field.annotation)
        if _is_options_model(tp):
            flags += cli_flags(tp, path + (name,))
            continue
        tp = extra.get("cli_type") or tp
        help_text = field.description or ""
        if get_origin(tp) is Literal:  # choices: validated by the model (one error line)
            help_text += f" One of: {', '.join(map(str, get_args(tp)))}."
            tp = str
        elif get_origin(tp) in (list, List):
            (item,) = get_args(tp)
            tp = List[_strip_optional(item)]
        if tp not in (str, int, float, bool, Path) and get_origin(tp) not in (list, List):
            raise TypeError(f"{cls.__name__}.{name}: no CLI flag for type {tp!r}; "
                            f"give it cli_type=..., or cli=False (config file only)")
        decls = extra.get("flags") or ["--" + name.replace("_", "-")
                                       + (f"/--no-{name.replace('_', '-')}" if tp is bool else "")]
        # "\\[": a literal "[" for rich
        shown = (f"\\[{shown_default(field)}]" if field.is_required()
                 else f"\\[default: {shown_default(field)}]")
        info = typer.Option(None, *decls, help=f"{help_text} {shown}".strip(), show_default=False,
                            envvar=extra.get("envvar"))
        flags.append(CliFlag(path + (name,), Optional[tp], info))
    names = [f.name for f in flags]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise TypeError(f"{cls.__name__}: flattened flags named twice: {dup}")
    return flags


def cli_values(flags: list[CliFlag], values: Mapping[str, Any]) -> dict[str, Any]:
    """The flags given (None and typer's [] for a repeated option not given are "not given"),
    nested as the model nests them."""
    out: dict[str, Any] = {}
    for f in flags:
        value = values.get(f.name)
        if value is None or value == []:
            continue
        where = out
        for key in f.path[:-1]:
            where = where.setdefault(key, {})
        where[f.name] = list(value) if isinstance(value, (list, tuple)) else value
    return out


def options_command(cls: type[O], *, config_help: str = CONFIG_HELP,
                    build: Callable[..., O] | None = None, build_args: tuple[str, ...] = ()):
    """Decorate `fn(o: cls, **params)`: the typer command taking `fn`'s own parameters, `--config`
    and one flag per field of `cls`; `fn` receives the validated
    options. `build(cli, config, **build_args)` replaces `build_options` where a command merges its
    sources its own way (serve); the parameters named in `build_args` go to it, not to `fn`."""

    import typer

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        own = list(inspect.signature(fn, eval_str=True).parameters.values())[1:]
        flags = cli_flags(cls)
        config = inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY,
                                   default=typer.Option(None, "--config", "-c", help=config_help),
                                   annotation=Optional[Path])
        params = own + [config] + [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.info,
                                     annotation=f.annotation) for f in flags]
        names = [p.name for p in params]
        clash = sorted({n for n in names if names.count(n) > 1})
        if clash:
            raise TypeError(f"{fn.__name__}: parameters named like an option of {cls.__name__}: {clash}")

        @functools.wraps(fn)
        def command(*args: Any, **kwargs: Any) -> Any:
            config = kwargs.pop("config", None)
            cli = cli_values(flags, {f.name: kwargs.pop(f.name, None) for f in flags})
            if build is None:
                o = build_options(cls, cli, config)
            else:
                o = build(cli, config, **{n: kwargs.pop(n) for n in build_args})
            return fn(o, *args, **kwargs)

        command.__signature__ = inspect.Signature(
            [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in params])
        command.__annotations__ = {p.name: p.annotation for p in params}  # typer reads both
        return command

    return decorate

