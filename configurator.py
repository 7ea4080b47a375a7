"""
Settings for the scripts: defaults, then config files, then --key=value, in that order of precedence.

    python train.py config/train_15m.py --batch_size=64 --compile=False

A config file is plain Python (see config/), run in its own namespace: every top-level name it
assigns (except _private ones, imports, functions and classes) must be a known key. A --key=value
is read as a Python literal (64, 3e-4, None, True, 'text'); for a string key the text is taken as
it is, so --out_dir=out/run-1 needs no quotes. An int is accepted where a float is expected (and a
whole float such as 2e5 where an int is), and a value may itself contain '='. A None default takes
the types its annotation allows (`n_kv_heads: int | None = None`, passed in `types`), or anything when
it has none. Anything else (an unknown key, a wrong type, a missing file) is a ConfigError whose
one-line message says what to change.

parse_config() is pure, so the tests call it directly; train.py, sample.py and export.py share it.
The dict it returns also says where each setting came from (`.source`: 'default', the config file's path
or 'command line'): a resumed run keeps its checkpoint's value of every setting not on the command line.
A script may name its settings' names in other projects (`renamed`: the "did you mean" points at ours) and
names it accepts but has no use for (`ignored`: {name: why}, said in a note in `.notes`).
"""
import ast
import difflib
import os
import types
import typing

DEFAULT, COMMAND_LINE = "default", "command line"  # where a setting came from, beside config files' paths
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


class ConfigError(Exception):
    pass


def _unknown_key(key: str, valid, where: str, renamed: dict) -> ConfigError:
    close = [renamed[key]] if key in renamed else difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
    hint = f"did you mean '{close[0]}'?" if close else "valid keys: " + ", ".join(sorted(valid))
    return ConfigError(f"unknown config key '{key}' ({where}); {hint}")


class Config(dict):
    """The settings, plus `source`: {key: 'default', a config file's path or 'command line'}, and `notes`:
    what the script should say about them at start."""

    def __init__(self, settings: dict, source: dict, notes: list | None = None):
        super().__init__(settings)
        self.source, self.notes = dict(source), list(notes or [])

    @property
    def given(self) -> set:
        # the keys a config file or the command line set
        return {k for k, where in self.source.items() if where != DEFAULT}


def as_config(settings: dict, defaults: dict) -> Config:
    # settings in a plain dict (a script called from Python): those off their defaults count as typed
    return Config(settings, {k: COMMAND_LINE if v is not None and v != defaults.get(k) else DEFAULT
                             for k, v in settings.items()})


def allowed_types(annotation) -> tuple:
    # `int | None` -> (int,); `float | str | None` -> (float, str)
    return tuple(t for t in (typing.get_args(annotation) or (annotation,)) if t is not type(None))


def _convert(value, expected: type):
    # value as an `expected`, or None when it is not one
    if expected is bool:
        return value if isinstance(value, bool) else None
    if isinstance(value, bool):
        return None
    if expected is float and isinstance(value, (int, float)):  # an int is fine for a float
        return float(value)
    if expected is int and isinstance(value, float) and value.is_integer():  # --max_iters=2e5
        return int(value)
    return value if isinstance(value, expected) else None


def _coerce(key: str, value, default, where: str, annotation=None):
    # returns value as the default's type (or one its annotation allows), or raises
    if default is None and annotation is None:
        return value
    expected = allowed_types(annotation) if default is None else (type(default),)
    if value is None:
        if default is None:
            return None
        raise ConfigError(f"{key} cannot be None ({where}); "
                          f"it is a {expected[0].__name__} (default {default!r})")
    for t in expected:
        if (converted := _convert(value, t)) is not None:
            return converted
    like = f"like the default {default!r}" if default is not None else "or None"
    raise ConfigError(f"{key}={value!r} ({where}) has the wrong type: expected "
                      f"{' or '.join(t.__name__ for t in expected)} {like}, got {type(value).__name__}")


def _parse_cli_value(raw: str, default, annotation=None):
    # the text after '=' on the command line, read according to the default's type
    if isinstance(default, bool):
        word = raw.strip().lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
        return raw  # _coerce reports it
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return raw  # not a literal: plain text (a path, a name)
    text_setting = isinstance(default, str) or (default is None and allowed_types(annotation) == (str,))
    if text_setting and not isinstance(value, str):
        return raw  # --wandb_run_name=2024 is the text '2024'
    return value


def _read_config_file(path: str) -> dict:
    if not os.path.isfile(path):
        hint = " (settings are given as --key=value)" if not path.endswith(".py") else ""
        raise ConfigError(f"config file not found: {path}{hint}")
    with open(path, encoding="utf-8") as f:
        source = f.read()
    namespace: dict = {}
    try:
        exec(compile(source, path, "exec"), namespace)  # its own namespace, away from the script's globals
    except SyntaxError as e:
        raise ConfigError(f"{path}:{e.lineno}: syntax error: {e.msg}") from None
    except Exception as e:  # any error while running the file, reported in one line
        raise ConfigError(f"{path}: {type(e).__name__}: {e}") from None
    return {
        k: v for k, v in namespace.items()
        if not k.startswith("_") and not isinstance(v, (types.ModuleType, types.FunctionType, type))
    }


def parse_config(defaults: dict, argv: list[str], types: dict | None = None, renamed: dict | None = None,
                 ignored: dict | None = None) -> Config:
    """defaults: {key: default value}; argv: config files and --key=value (e.g. sys.argv[1:]); types:
    {key: annotation} for keys whose default is None; renamed: {another project's name: ours}; ignored:
    {name: why it is not needed}. Returns a new dict: the defaults with the files applied in order, then
    the overrides."""
    types, renamed, ignored = types or {}, renamed or {}, ignored or {}
    config = Config(defaults, dict.fromkeys(defaults, DEFAULT))
    files = [a for a in argv if not a.startswith("-")]
    overrides = [a for a in argv if a.startswith("-")]

    def setting(key: str, where: str):
        if key in ignored:
            config.notes.append(f"note: {key} ({where}) is not needed here: {ignored[key]}")
            return False
        if key not in defaults:
            raise _unknown_key(key, defaults, where, renamed)
        return True

    for path in files:
        for key, value in _read_config_file(path).items():
            if setting(key, f"in {path}"):
                config[key] = _coerce(key, value, defaults[key], f"in {path}", types.get(key))
                config.source[key] = path
    for arg in overrides:
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"cannot read argument '{arg}': "
                              "settings are --key=value, config files are paths")
        key, sep, raw = arg[2:].partition("=")  # only the first '=' separates: values may contain '='
        if not setting(key, f"from {arg}"):
            continue
        if not sep:
            if not isinstance(defaults[key], bool):
                raise ConfigError(f"{arg} needs a value: --{key}=VALUE (default {defaults[key]!r})")
            raw = "True"  # a bare --flag switches a boolean on
        value = _parse_cli_value(raw, defaults[key], types.get(key))
        config[key] = _coerce(key, value, defaults[key], f"from {arg}", types.get(key))
        config.source[key] = COMMAND_LINE
    return config


def format_config(config: dict) -> str:
    # one key per line, aligned, for the run's log
    width = max(map(len, config), default=0)
    return "\n".join(f"  {k:<{width}} = {v!r}" for k, v in config.items())


def usage(synopsis: str, doc: str, options: dict) -> str:
    """A script's --help: the synopsis, its docstring, then each option {name: (default, help)} with its
    default as it is typed on the command line (text without quotes)."""
    shown = {name: '""' if d == "" else d if isinstance(d, str) else repr(d)
             for name, (d, _) in options.items()}
    width = max(len(f"--{name}={value}") for name, value in shown.items())
    lines = [f"usage: {synopsis}", "", doc.strip(), "", "options:"]
    lines += [f"  {f'--{name}={shown[name]}':<{width}}  {text}" for name, (_, text) in options.items()]
    return "\n".join(lines)
