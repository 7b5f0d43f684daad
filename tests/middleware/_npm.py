"""The npm packages the wrap/proxy tests drive: installed once per lock file with `npm ci`.

`tests/middleware/npm/package-lock.json` pins `@modelcontextprotocol/server-everything` and
`@modelcontextprotocol/inspector`. They go into a cache directory keyed by the lock file's hash
(`MCP_METRICS_NPM_CACHE`, default `~/.cache/mcp-metrics-tests`), under a file lock so that the
pytest-xdist workers install it once.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

NPM_DIR = Path(__file__).with_name("npm")
INSTALL_HINT = (
    "needs Node.js 20+ and npm (Debian: apt-get install nodejs npm); "
    "./scripts/test installs them when missing"
)


@dataclass(frozen=True)
class NpmTools:
    root: Path

    @property
    def everything(self) -> list[str]:
        """The reference server's command line; add "stdio", "sse" or "streamableHttp"."""
        return [str(self.root / "node_modules" / ".bin" / "mcp-server-everything")]

    @property
    def inspector(self) -> list[str]:
        return [str(self.root / "node_modules" / ".bin" / "mcp-inspector"), "--cli"]


def install() -> NpmTools | str:
    """The installed tools, or the reason they cannot be installed."""
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None:
        return INSTALL_HINT
    lock = (NPM_DIR / "package-lock.json").read_bytes()
    digest = hashlib.sha256(lock + (NPM_DIR / "package.json").read_bytes()).hexdigest()[:16]
    base = Path(
        os.environ.get("MCP_METRICS_NPM_CACHE") or Path.home() / ".cache" / "mcp-metrics-tests"
    )
    root = base / f"npm-{digest}"
    done = root / ".installed"
    base.mkdir(parents=True, exist_ok=True)
    with (base / f"npm-{digest}.lock").open("w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir()
            for name in ("package.json", "package-lock.json"):
                shutil.copy(NPM_DIR / name, root / name)
            result = subprocess.run(
                [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
                cwd=root,
                capture_output=True,
                timeout=600,
            )
            if result.returncode != 0:
                return f"npm ci failed: {result.stderr.decode(errors='replace')[-1000:]}"
            done.write_text(digest)
    return NpmTools(root)
