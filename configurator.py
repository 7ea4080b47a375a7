"""
Settings for the scripts: defaults, then config files, then --key=value, in that order of precedence.

    python train.py config/train_15m.py --batch_size=64 --compile=False

A config file is plain Python (see config/), run in its own namespace: every top-level name it
assigns (except _private ones, imports, functions and classes) must be a known key. A --key=value
is read as a Python literal (64, 3e-4, None, True, 'text'); for a string key the text is taken as
it is, so --out_dir=out/run-1 needs no quotes. An int is accepted where a float is expected (and a
whole float such as 2e5 where an int is), any type replaces a None default, and a value may itself
contain '='. Anything else (an unknown key, a wrong type, a missing file) is a ConfigError whose
one-line message says what to change.

parse_config() is pure, so the tests call it directly; train.py and sample.py share it.
"""
import ast
import difflib
import os
import types

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


class ConfigError(Exception):
    pass


def _unknown_key(key: str, valid, where: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
    hint = f"did you mean '{close[0]}'?" if close else "valid keys: " + ", ".join(sorted(valid))
    return ConfigError(f"unknown config key '{key}' ({where}); {hint}")


def _coerce(key: str, value, default, where: str):
    # returns value as the default's type, or raises; a None default takes anything
    if default is None:
        return value
    expected = type(default)
    if value is None:
        raise ConfigError(f"{key} cannot be None ({where}); it is a {expected.__name__} (default {default!r})")
    if expected is bool:
        if isinstance(value, bool):
            return value
    elif expected is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):  # an int is fine for a float
            return float(value)
    elif expected is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():  # --max_iters=2e5
            return int(value)
    elif isinstance(value, expected):
        return value
    raise ConfigError(f"{key}={value!r} ({where}) has the wrong type: expected {expected.__name__} "
                      f"like the default {default!r}, got {type(value).__name__}")


def _parse_cli_value(raw: str, default):
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
    if isinstance(default, str) and not isinstance(value, str):
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
        exec(compile(source, path, "exec"), namespace)  # its own namespace: it cannot touch the script's globals
    except SyntaxError as e:
        raise ConfigError(f"{path}:{e.lineno}: syntax error: {e.msg}") from None
    except Exception as e:  # any error while running the file, reported in one line
        raise ConfigError(f"{path}: {type(e).__name__}: {e}") from None
    return {
        k: v for k, v in namespace.items()
        if not k.startswith("_") and not isinstance(v, (types.ModuleType, types.FunctionType, type))
    }


def parse_config(defaults: dict, argv: list[str]) -> dict:
    """defaults: {key: default value}; argv: config files and --key=value (e.g. sys.argv[1:]).
    Returns a new dict: the defaults with the files applied in order, then the overrides."""
    config = dict(defaults)
    files = [a for a in argv if not a.startswith("-")]
    overrides = [a for a in argv if a.startswith("-")]
    for path in files:
        for key, value in _read_config_file(path).items():
            if key not in defaults:
                raise _unknown_key(key, defaults, f"in {path}")
            config[key] = _coerce(key, value, defaults[key], f"in {path}")
    for arg in overrides:
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"cannot read argument '{arg}': settings are --key=value, config files are paths")
        key, sep, raw = arg[2:].partition("=")  # only the first '=' separates: values may contain '='
        if key not in defaults:
            raise _unknown_key(key, defaults, f"from {arg}")
        if not sep:
            if not isinstance(defaults[key], bool):
                raise ConfigError(f"{arg} needs a value: --{key}=VALUE (default {defaults[key]!r})")
            raw = "True"  # a bare --flag switches a boolean on
        config[key] = _coerce(key, _parse_cli_value(raw, defaults[key]), defaults[key], f"from {arg}")
    return config


def format_config(config: dict) -> str:
    # one key per line, aligned, for the run's log
    width = max(map(len, config), default=0)
    return "\n".join(f"  {k:<{width}} = {v!r}" for k, v in config.items())
