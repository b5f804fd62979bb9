"""The generated-spec directory: the specs the pipeline writes (L1's `S*`, L5's `F*`), visible and editable.

It is `$DISPATCH_SPECS/<project>/generated/`, beside the project's own specs and `pipeline.yaml` (for a project
bundled in `examples/`, whose folder is part of the source tree: `DISPATCH_HOME/generated/<project>/`). Its
specs are dispatched by the project flow like any others (same slots, locks, model chain, retries, nodes),
under their own run key `<project>.pipeline`: the state file, run directories, cache keys, flow run name and
git branches are `<project>.pipeline`'s, so they never clash with `dispatch start <project>`, which does not
look into sub-directories. Watch them with `dispatch status <project>.pipeline`.

A hidden manifest (`.manifest.json`: file name -> sha256 of what the pipeline wrote) tells our files from a
person's edits: the pipeline rewrites or removes only files whose content is still what it wrote; a file
edited by hand is kept as it is, and the layer says so.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from dispatch.core.dag import Project, load_project
from dispatch.core.errors import ConfigError, DispatchError
from dispatch.core.settings import DispatchSettings
from dispatch.core.specs import context_files

GENERATED_DIR = "generated"
RUN_SUFFIX = ".pipeline"
_MANIFEST = ".manifest.json"
_BUNDLED = Path(__file__).resolve().parents[2] / "examples"
_NAME = re.compile(r"^[SF]\d{2,4}-[a-z0-9][a-z0-9-]{0,60}\.md$")
_NUMBER = re.compile(r"^([SF])(\d+)")


def run_key(project: str) -> str:
    """The project name the generated specs are dispatched under: `<project>.pipeline`."""
    return f"{project}{RUN_SUFFIX}"


def generated_dir(settings: DispatchSettings, project: str) -> Path:
    """The project's generated-spec directory (see the module doc)."""
    root = settings.specs_root_for(project)
    if root.resolve().is_relative_to(_BUNDLED):
        return settings.home / GENERATED_DIR / project
    return root / GENERATED_DIR


def load_specs(settings: DispatchSettings, project: str, generated: bool = False) -> Project:
    """The project's own specs, or (`generated`) its generated specs as the project `<project>.pipeline`, with
    the project's context files as theirs too."""
    if not generated:
        return load_project(project, settings.specs_root_for(project))
    name = run_key(project)
    if (settings.specs / name).is_dir():
        raise DispatchError(f"{settings.specs / name} is a project of its own, but {name!r} is the run name of "
                            f"{project}'s generated specs; rename that project")
    proj = load_project(name, generated_dir(settings, project))
    proj.context = [*context_files(settings.specs_root_for(project)), *proj.context]
    return proj


def slug(text: str, limit: int = 40) -> str:
    """A file-name-safe lowercase slug of `text` (letters, digits, dashes), at most `limit` characters."""
    words = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return words[:limit].rstrip("-") or "spec"


@dataclass
class WriteReport:
    """What a write did: files written, files kept because a person edited them, stale files removed."""

    written: list[Path] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)


class GeneratedSpecs:
    """The generated-spec directory of one project.

    Args:
        directory: the directory (created on first write).
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _manifest(self) -> dict[str, str]:
        try:
            data = json.loads((self.directory / _MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}

    def _save_manifest(self, manifest: dict[str, str]) -> None:
        _write_atomic(self.directory / _MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")

    def _edited(self, path: Path, manifest: dict[str, str], new: str | None = None) -> bool:
        """Whether `path` holds content a person wrote: neither what the pipeline last wrote there nor `new`."""
        if path.is_symlink():
            raise ConfigError(f"{path}: a generated spec must be a regular file, not a symlink; remove the link")
        if not path.exists():
            return False
        digest = _digest(path.read_bytes())
        return digest != manifest.get(path.name) and (new is None or digest != _digest(new.encode()))

    def numbers(self, prefix: str) -> list[int]:
        """The numbers of the `prefix` specs (S or F) in the directory, sorted."""
        if not self.directory.is_dir():
            return []
        found = (_NUMBER.match(p.name) for p in self.directory.glob(f"{prefix}*.md"))
        return sorted(int(m.group(2)) for m in found if m and m.group(1) == prefix)

    def write(self, files: dict[str, str], *, prefix: str, replace: bool) -> WriteReport:
        """Write generated specs.

        Args:
            files: file name (`S01-....md`, `F03-....md`) -> content.
            prefix: the kind written, S or F.
            replace: also remove the pipeline's own `prefix` files that `files` no longer holds (unedited ones).

        Raises:
            ConfigError: a name is not a generated spec's name, or a target is a symlink.
        """
        for name in files:
            if not _NAME.match(name) or not name.startswith(prefix):
                raise ConfigError(f"{self.directory}: {name!r} is not a generated {prefix} spec name "
                                  f"({prefix}<digits>-<slug>.md)")
        self.directory.mkdir(parents=True, exist_ok=True)
        manifest, report = self._manifest(), WriteReport()
        for name, text in sorted(files.items()):
            path = self.directory / name
            if self._edited(path, manifest, text):
                report.kept.append(path)
                continue
            _write_atomic(path, text)
            manifest[name] = _digest(text.encode())
            report.written.append(path)
        if replace:
            for name in sorted(set(manifest) - set(files)):
                path = self.directory / name
                if not name.startswith(prefix):
                    continue
                if path.exists() and self._edited(path, manifest):
                    report.kept.append(path)
                    continue
                path.unlink(missing_ok=True)
                manifest.pop(name)
                report.removed.append(name)
        self._save_manifest(manifest)
        return report


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
