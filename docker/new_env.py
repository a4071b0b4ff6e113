"""Writes .env from .env.example with a fresh random value for every secret (each
`change-me`); an existing .env is kept: its secrets are the ones the volumes were made with.

    python3 docker/new_env.py
"""

from __future__ import annotations

import secrets
import string
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLACEHOLDER = "change-me"
# Passwords mix in "@", ":" and "/", which a URI must quote; no "$", "#", quote or space,
# which .env's syntax would read. Tokens and keys are hex.
PASSWORD_CHARACTERS = string.ascii_letters + string.digits + "@:/%+="


def new_secret(name: str) -> str:
    if name.endswith(("_TOKEN", "_KEY")):
        return secrets.token_hex(32)
    while True:  # one that needs quoting in a URI: every start of the stack proves it is
        password = "".join(secrets.choice(PASSWORD_CHARACTERS) for _ in range(32))
        if set(password) & set("@:/"):
            return password


def filled(template: str) -> str:
    lines = []
    for line in template.splitlines():
        name, _, value = line.partition("=")
        if value == PLACEHOLDER and not line.startswith("#"):
            line = f"{name}={new_secret(name)}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def main(root: Path = ROOT) -> None:
    env = root / ".env"
    if env.exists():
        print(f"{env} exists: kept (delete it for new secrets, and the volumes with them)")
        return
    env.write_text(filled((root / ".env.example").read_text()))
    env.chmod(0o600)
    print(f"wrote {env} with fresh secrets")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT)
