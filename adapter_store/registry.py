"""Adapter id -> validated source.

Every adapter the server may load passes through ``AdapterRegistry.register``: the name is checked
against ``[A-Za-z0-9._-]{1,128}``, the folder must resolve (symlinks followed) inside an allowed root, the
weights must be ``adapter_model.safetensors`` (a ``.bin`` is never unpickled, no remote code runs), the
config must describe a LoRA whose rank and target modules fit the resident base. A refusal is an
``AdapterRefusedError`` naming the reason; it never affects other adapters.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
MAX_CONFIG_BYTES = 1 << 20
MAX_PATH_BYTES = 4095  # Linux PATH_MAX less the NUL
MAX_NAME_BYTES = 255  # NAME_MAX of common file systems
_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")
_HUB_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
_HASH_CHUNK = 1 << 20


class AdapterRefusedError(Exception):
    """An adapter that cannot be registered. ``reason`` is a short code, ``status`` the HTTP status,
    ``str()`` a message that says what to fix."""

    def __init__(self, reason: str, message: str, *, status: int = 400) -> None:
        super().__init__(message)
        self.reason = reason
        self.status = status
        self.message = message


@dataclass(slots=True, frozen=True)
class AdapterSource:
    """One validated version of an adapter: where its files are and what they hold."""

    name: str
    path: Path
    digest: str  # sha256 hex of adapter_model.safetensors
    rank: int
    target_modules: tuple[str, ...]
    base_model_name_or_path: str | None
    config: dict[str, Any] = field(repr=False, compare=False)

    @property
    def weights_path(self) -> Path:
        return self.path / WEIGHTS_NAME


def check_name(name: str) -> None:
    """Raise ``AdapterRefusedError("bad_name")`` unless ``name`` is a safe adapter id."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or ".." in name:
        raise AdapterRefusedError(
            "bad_name",
            f"adapter name {name!r} is not allowed: use 1-128 characters of A-Z a-z 0-9 . _ - and no '..'",
        )


def _check_path_length(raw: str) -> None:
    """Refuse a path the file system cannot hold (a name over NAME_MAX or a path over PATH_MAX bytes):
    the OS would raise ENAMETOOLONG from deep inside a check."""
    encoded = raw.encode("utf-8", "surrogateescape")
    longest = max((len(part) for part in encoded.split(b"/")), default=0)
    if len(encoded) > MAX_PATH_BYTES or longest > MAX_NAME_BYTES:
        raise AdapterRefusedError(
            "bad_path",
            f"adapter path is too long ({len(encoded)} bytes, longest part {longest}): the limits are "
            f"{MAX_PATH_BYTES} bytes in all and {MAX_NAME_BYTES} per folder name",
        )


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _check_safetensors_header(name: str, path: Path) -> None:
    """Cheap corruption check: the header parses, the tensors fit the file, LoRA weights are there."""
    bad = f"adapter {name!r}: {WEIGHTS_NAME} is corrupt or truncated"
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n <= 1 or n > min(size - 8, 100 << 20):
                raise AdapterRefusedError("corrupt", bad, status=422)
            header = json.loads(f.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise AdapterRefusedError("corrupt", bad, status=422) from None
    if not isinstance(header, dict):
        raise AdapterRefusedError("corrupt", bad, status=422)
    ends = [
        v.get("data_offsets", [0, 0])[1]
        for k, v in header.items()
        if k != "__metadata__" and isinstance(v, dict)
    ]
    if not ends or 8 + n + max(ends) != size:
        raise AdapterRefusedError("corrupt", bad, status=422)
    if not any("lora_" in k for k in header):
        raise AdapterRefusedError(
            "not_lora", f"adapter {name!r}: {WEIGHTS_NAME} holds no LoRA weights", status=422
        )


def _stat_key(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class AdapterRegistry:
    """Registered adapters by name. Thread-safe; ``get`` also discovers ``adapter_dir/<name>`` folders
    added after start. Validation reads only the config and hashes the weights; it loads no tensors."""

    def __init__(
        self,
        roots: Sequence[Path],
        *,
        adapter_dir: Path | None,
        base_model_ids: Collection[str],
        base_module_names: Collection[str],
        max_lora_rank: int,
        strict_base: bool = False,
        allow_hub: bool = False,
        unservable_modules: Mapping[str, str] | None = None,
    ) -> None:
        self._adapter_dir = adapter_dir.resolve() if adapter_dir is not None else None
        resolved = [Path(r).resolve() for r in roots]
        if self._adapter_dir is not None and self._adapter_dir not in resolved:
            resolved.insert(0, self._adapter_dir)
        self._roots = tuple(resolved)
        self._base_ids = {b for b in base_model_ids if b} | {Path(b).name for b in base_model_ids if b}
        self._module_names = frozenset(base_module_names)
        # module name -> why adapters on it cannot be served on this base (refused, never served wrong)
        self._unservable = dict(unservable_modules or {})
        self._max_rank = max_lora_rank
        self._strict_base = strict_base
        self._allow_hub = allow_hub
        self._sources: dict[str, AdapterSource] = {}
        self._unregistered: set[str] = set()  # not rediscovered from adapter_dir until registered again
        self._hash_cache: dict[Path, tuple[tuple[int, int, int], str]] = {}
        self._lock = threading.RLock()

    @property
    def roots(self) -> tuple[Path, ...]:
        return self._roots

    # ----------------------------------------------------------------------------------- public API
    def scan(self) -> list[AdapterRefusedError]:
        """Register every folder of ``adapter_dir``. Bad folders are logged and returned, never raised."""
        refused: list[AdapterRefusedError] = []
        if self._adapter_dir is None or not self._adapter_dir.is_dir():
            return refused
        for entry in sorted(self._adapter_dir.iterdir()):
            if entry.name.startswith("."):
                continue
            try:
                self.register(entry.name, entry)
            except AdapterRefusedError as e:
                log.warning("skipping adapter folder %s: %s", entry, e)
                refused.append(e)
        return refused

    def register(self, name: str, path: str | Path) -> AdapterSource:
        """Validate and register ``path`` as ``name``. Same name with changed files = new version."""
        check_name(name)
        folder = self._resolve(path)
        try:
            source = self._validate(name, folder)
        except OSError as e:  # a file went away or became unreadable while being checked
            raise AdapterRefusedError(
                "unreadable", f"adapter {name!r}: cannot read {folder}: {e.strerror or e}", status=422
            ) from None
        with self._lock:
            old = self._sources.get(name)
            self._sources[name] = source
            self._unregistered.discard(name)
        if old is not None and old.digest != source.digest:
            log.info("adapter %s: new version %s (was %s)", name, source.digest[:12], old.digest[:12])
        return source

    def unregister(self, name: str) -> None:
        with self._lock:
            if self._sources.pop(name, None) is None:
                raise AdapterRefusedError("not_found", f"adapter {name!r} is not registered", status=404)
            self._unregistered.add(name)

    def peek(self, name: str) -> AdapterSource | None:
        """The current version of ``name`` without discovery (cheap; any thread)."""
        with self._lock:
            return self._sources.get(name)

    def get(self, name: str) -> AdapterSource | None:
        """The current version of ``name``; discovers ``adapter_dir/<name>`` on first use."""
        with self._lock:
            source = self._sources.get(name)
            hidden = name in self._unregistered
        if source is not None or hidden or self._adapter_dir is None:
            return source
        try:
            check_name(name)
        except AdapterRefusedError:
            return None
        candidate = self._adapter_dir / name
        if not candidate.is_dir():
            return None
        try:
            return self.register(name, candidate)
        except AdapterRefusedError as e:
            log.warning("adapter folder %s refused: %s", candidate, e)
            return None

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._sources)

    # ------------------------------------------------------------------------------------ internals
    def _resolve(self, path: str | Path) -> Path:
        raw = str(path)
        if not raw or "\x00" in raw:
            raise AdapterRefusedError("bad_path", "adapter path is empty or contains a NUL byte")
        _check_path_length(raw)
        try:
            return self._resolve_folder(raw)
        except OSError as e:  # what the checks above cannot foresee (EACCES, ELOOP, ...): the caller's path
            raise AdapterRefusedError(
                "bad_path", f"adapter path {raw!r} cannot be read: {e.strerror or e}"
            ) from None

    def _resolve_folder(self, raw: str) -> Path:
        p = Path(raw)
        if raw.startswith("~"):
            try:
                p = p.expanduser()
            except RuntimeError:  # "~someone" with no such user
                raise AdapterRefusedError(
                    "not_found", f"adapter folder {raw!r} does not exist", status=404
                ) from None
        if not p.is_absolute():
            # relative paths are read against the adapter dir (or the first root)
            base = self._adapter_dir or (self._roots[0] if self._roots else None)
            if base is None:
                raise AdapterRefusedError("path_escape", f"relative adapter path {raw!r} but no root is set")
            if not (base / p).exists() and self._allow_hub and _HUB_ID_RE.fullmatch(raw):
                return self._download(raw)
            p = base / p
        try:
            folder = p.resolve(strict=True)
        except (FileNotFoundError, NotADirectoryError, RuntimeError):
            raise AdapterRefusedError(
                "not_found", f"adapter folder {raw!r} does not exist", status=404
            ) from None
        self._check_contained(folder, raw)
        if not folder.is_dir():
            raise AdapterRefusedError("not_found", f"adapter path {raw!r} is not a folder", status=404)
        return folder

    def _check_contained(self, resolved: Path, shown: str) -> None:
        if not any(resolved.is_relative_to(root) for root in self._roots):
            allowed = ", ".join(str(r) for r in self._roots) or "(none configured)"
            raise AdapterRefusedError(
                "path_escape",
                f"adapter path {shown!r} resolves outside the allowed adapter roots ({allowed}); "
                "copy the adapter under one of them",
                status=400,
            )

    def _download(self, repo_id: str) -> Path:
        """Fetch a hub adapter (only with ``allow_hub``): config and safetensors weights, nothing else."""
        from huggingface_hub import snapshot_download  # optional path, never used without allow_hub

        try:
            local = snapshot_download(repo_id, allow_patterns=[CONFIG_NAME, WEIGHTS_NAME])
        except Exception as e:  # the hub client raises many types; all mean "cannot fetch"
            raise AdapterRefusedError("not_found", f"hub adapter {repo_id!r}: {e}", status=404) from e
        return Path(local).resolve()

    def _validate(self, name: str, folder: Path) -> AdapterSource:
        config_path = folder / CONFIG_NAME
        weights_path = folder / WEIGHTS_NAME
        if not weights_path.is_file():
            others = sorted(p.name for p in folder.glob("adapter_model.*"))
            hint = f" (found {', '.join(others)}: pickle files are never loaded)" if others else ""
            raise AdapterRefusedError(
                "no_safetensors",
                f"adapter {name!r}: {WEIGHTS_NAME} is missing{hint}; re-save it with "
                "save_pretrained(safe_serialization=True)",
                status=422,
            )
        if not config_path.is_file():
            raise AdapterRefusedError(
                "missing_config", f"adapter {name!r}: {CONFIG_NAME} is missing", status=422
            )
        for f in (config_path, weights_path):  # a symlinked file may escape on its own
            self._check_contained(f.resolve(), str(f))
        config = self._read_config(name, config_path)
        rank, targets = self._check_lora(name, config)
        base = config.get("base_model_name_or_path")
        base = base if isinstance(base, str) and base else None
        self._check_base(name, base)
        _check_safetensors_header(name, weights_path)
        digest = self._digest(weights_path)
        return AdapterSource(name, folder, digest, rank, targets, base, config)

    def _read_config(self, name: str, path: Path) -> dict[str, Any]:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise AdapterRefusedError(
                "bad_config", f"adapter {name!r}: {CONFIG_NAME} is too large", status=422
            )
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise AdapterRefusedError(
                "bad_config", f"adapter {name!r}: {CONFIG_NAME} is not valid JSON ({e})", status=422
            ) from None
        if not isinstance(config, dict):
            raise AdapterRefusedError(
                "bad_config", f"adapter {name!r}: {CONFIG_NAME} is not an object", status=422
            )
        return config

    def _check_lora(self, name: str, config: dict[str, Any]) -> tuple[int, tuple[str, ...]]:
        peft_type = config.get("peft_type")
        if peft_type != "LORA":
            raise AdapterRefusedError(
                "not_lora", f"adapter {name!r} has peft_type {peft_type!r}; only LORA is served", status=422
            )
        if config.get("use_dora"):
            raise AdapterRefusedError(
                "unsupported",
                f"adapter {name!r} uses DoRA, which mixed-adapter batches cannot run",
                status=422,
            )
        if config.get("modules_to_save"):
            raise AdapterRefusedError(
                "unsupported",
                f"adapter {name!r} has modules_to_save (a full trained copy of "
                f"{', '.join(map(str, config['modules_to_save']))}), which cannot share those layers with "
                "other tenants' LoRA weights; train a LoRA on them instead",
                status=422,
            )
        ranks = [config.get("r", 8), *dict(config.get("rank_pattern") or {}).values()]
        if not all(isinstance(r, int) and not isinstance(r, bool) and r > 0 for r in ranks):
            raise AdapterRefusedError(
                "bad_config", f"adapter {name!r}: rank must be a positive integer", status=422
            )
        rank = max(ranks)
        if rank > self._max_rank:
            raise AdapterRefusedError(
                "rank_too_high",
                f"adapter {name!r} has rank {rank}, above the server's max_lora_rank {self._max_rank}",
                status=422,
            )
        raw = config.get("target_modules")
        if isinstance(raw, str):
            targets: tuple[str, ...] = (raw,)
            if raw != "all-linear" and self._module_names:
                try:
                    pattern = re.compile(raw)
                except re.error as e:
                    raise AdapterRefusedError(
                        "bad_config", f"adapter {name!r}: target_modules regex is invalid ({e})", status=422
                    ) from None
                if not any(pattern.search(m) for m in self._module_names):
                    raise AdapterRefusedError(
                        "unknown_target",
                        f"adapter {name!r}: target_modules {raw!r} matches no module of the base",
                        status=422,
                    )
        elif isinstance(raw, list) and raw and all(isinstance(t, str) for t in raw):
            targets = tuple(sorted(raw))
            missing = [
                t for t in targets if self._module_names and t.rsplit(".", 1)[-1] not in self._module_names
            ]
            if missing:
                raise AdapterRefusedError(
                    "unknown_target",
                    f"adapter {name!r} targets modules the base does not have: {', '.join(missing)}",
                    status=422,
                )
        else:
            raise AdapterRefusedError(
                "bad_config",
                f"adapter {name!r}: target_modules must be a list of names or a regex",
                status=422,
            )
        self._check_servable(name, targets)
        return rank, targets

    def _check_servable(self, name: str, targets: tuple[str, ...]) -> None:
        for module, reason in self._unservable.items():
            if len(targets) == 1 and targets[0] not in self._module_names:
                hit = targets[0] == "all-linear" or re.search(targets[0], module) is not None
            else:
                hit = any(t.rsplit(".", 1)[-1] == module for t in targets)
            if hit:
                raise AdapterRefusedError(
                    "unsupported",
                    f"adapter {name!r}: target_modules includes {module!r}, which this server cannot serve "
                    f"on this base: {reason}",
                    status=422,
                )

    def _check_base(self, name: str, base: str | None) -> None:
        if base is None or not self._base_ids:
            return
        if base in self._base_ids or Path(base).name in self._base_ids:
            return
        message = (
            f"adapter {name!r} was trained on base {base!r}, but this server runs "
            f"{sorted(self._base_ids)[0]!r}"
        )
        if self._strict_base:
            raise AdapterRefusedError("base_mismatch", message + " (strict_base is on)", status=422)
        log.warning("%s; serving it anyway (strict_base is off)", message)

    def _digest(self, weights_path: Path) -> str:
        key = _stat_key(weights_path)
        resolved = weights_path.resolve()
        with self._lock:
            cached = self._hash_cache.get(resolved)
        if cached is not None and cached[0] == key:
            return cached[1]
        try:
            digest = sha256_file(weights_path)
        except OSError as e:
            raise AdapterRefusedError("unreadable", f"cannot read {weights_path}: {e}", status=422) from None
        with self._lock:
            self._hash_cache[resolved] = (key, digest)
        return digest
