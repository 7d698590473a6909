"""Contexts: named servers, each with its address and the absolute paths of its CA, client
certificate and key, in `$XDG_CONFIG_HOME/jobd/config.toml` (default ~/.config). Reads with
tomllib; writes the file's one flat shape itself. Imports only the standard library.

    config = Config.load()
    config.add(Context("dev", "127.0.0.1:9090", ca, cert, key)); config.save()
    context = config.select("dev")        # or None: the current one, if any

The file::

    current = "dev"

    [contexts.dev]
    server = "127.0.0.1:9090"
    ca = "/home/alice/jobd/certs/ca.pem"
    cert = "/home/alice/jobd/certs/alice.pem"
    key = "/home/alice/jobd/certs/alice.key"
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ClientError

__all__ = ["Config", "Context", "config_path"]

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
_FIELDS = ("server", "ca", "cert", "key")


def config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or ""
    root = Path(base) if base and os.path.isabs(base) else Path.home() / ".config"
    return root / "jobd" / "config.toml"


@dataclass(frozen=True, slots=True)
class Context:
    name: str
    server: str
    ca: Path
    cert: Path
    key: Path


def check_name(name: str) -> str:
    if not NAME.fullmatch(name):
        raise ClientError(
            f"{name!r} is not a context name: use letters, digits, '.', '_' and '-' "
            "(at most 63, starting with a letter or digit)",
            exit_code=2,
        )
    return name


@dataclass(slots=True)
class Config:
    path: Path
    contexts: dict[str, Context] = field(default_factory=dict)
    current: str = ""

    @classmethod
    def load(cls, path: Path | None = None) -> Config:
        path = path or config_path()
        try:
            with open(path, "rb") as file:
                data = tomllib.load(file)
        except FileNotFoundError:
            return cls(path)
        except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ClientError(f"cannot read the client config {path}: {exc}") from exc
        config = cls(path, current=str(data.get("current", "")))
        tables = data.get("contexts", {})
        if not isinstance(tables, dict):
            raise ClientError(f"{path}: `contexts` must be a table of [contexts.NAME] tables")
        for name, table in tables.items():
            missing = [f for f in _FIELDS if not isinstance(table, dict) or f not in table]
            if missing:
                raise ClientError(
                    f"{path}: context {name!r} lacks {', '.join(missing)}: fix it, or "
                    f"`jobd-client context rm {name}` and add it again"
                )
            config.contexts[name] = Context(
                name,
                str(table["server"]),
                Path(table["ca"]),
                Path(table["cert"]),
                Path(table["key"]),
            )
        return config

    def select(self, name: str | None) -> Context | None:
        """The context called name, else the current one (None when there is none)."""
        if name:
            if name not in self.contexts:
                known = ", ".join(sorted(self.contexts)) or "none yet"
                raise ClientError(
                    f"no context {name!r} in {self.path} (known: {known}): add it with "
                    f"`jobd-client context add {name} --server HOST:PORT --ca FILE --cert FILE "
                    "--key FILE`"
                )
            return self.contexts[name]
        return self.contexts.get(self.current)

    def save(self) -> None:
        """Write the file atomically (a temporary file renamed over it), private to its user:
        it names key files."""
        lines = []
        if self.current:
            lines += [f"current = {_string(self.current)}", ""]
        for name in sorted(self.contexts):
            context = self.contexts[name]
            lines.append(f"[contexts.{_key(name)}]")
            for key in _FIELDS:
                lines.append(f"{key} = {_string(str(getattr(context, key)))}")
            lines.append("")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write("\n".join(lines))
        os.replace(temporary, self.path)


def _key(name: str) -> str:
    # Names are checked on add; a hand-written one with other characters gets quoted.
    return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else _string(name)


def _string(text: str) -> str:
    """A TOML basic string: JSON's escapes are TOML's, except that TOML also forbids a raw
    DEL, and JSON's surrogate pairs (ensure_ascii) are not TOML: keep other text as is."""
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")
