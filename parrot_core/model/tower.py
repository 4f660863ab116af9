"""Vision tower resolution: the official config.json only names the CLIP tower (`mm_vision_tower`).

Order: an explicit override; the `vision_config` our own outputs embed; a directory holding a
CLIP config.json (absolute, or relative to the checkpoint directory); the hub cache; the
built-in table of released towers. Preprocessor settings come from the tower directory's
preprocessor_config.json, else the model directory's, else CLIP defaults at the tower's size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import ParrotError
from .config import KNOWN_VISION_TOWERS, ParrotConfig, VisionConfig
from .image import PREPROCESSOR_NAME, ImageSettings
from .schema import parse_json, show


@dataclass
class ResolvedTower:
    config: VisionConfig
    image: ImageSettings
    directory: Path | None  # a CLIP checkpoint directory (config, preprocessor, maybe weights)
    source: str


def _read_clip_dir(d: Path) -> VisionConfig:
    path = d / "config.json"
    raw = parse_json(path.read_bytes(), str(path))
    if not isinstance(raw, dict):
        raise ParrotError(f"{path}: expected a JSON object (a CLIP config), not {show(raw)}")
    if raw.get("model_type") not in (None, "clip", "clip_vision_model"):
        raise ParrotError(f"{path}: model_type {show(raw.get('model_type'))} is not a CLIP tower")
    return VisionConfig.from_dict(raw, str(path))


def _hub_cache_dir(repo_id: str) -> Path | None:
    """The locally cached snapshot of a hub id, if huggingface_hub has one (never downloads)."""
    if repo_id.count("/") != 1 or Path(repo_id).is_absolute():
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        hit = try_to_load_from_cache(repo_id, "config.json")
    except Exception:
        return None
    return Path(hit).parent if isinstance(hit, str) else None


def _cut(name: str | None, limit: int = 200) -> str | None:
    return name if name is None or len(name) <= limit else name[:limit] + "..."


def find_tower_dir(name: str, model_dir: Path | None) -> Path | None:
    candidates = [Path(name)] if Path(name).is_absolute() else []
    if not Path(name).is_absolute():
        if model_dir is not None:
            candidates.append(model_dir / name)
        candidates.append(Path.cwd() / name)
    for c in candidates:
        try:
            if (c / "config.json").is_file():
                return c
        except OSError:  # a name the file system cannot hold (too long)
            continue
    return _hub_cache_dir(name)


def _image_settings(cfg: ParrotConfig, vision: VisionConfig, *dirs: Path | None) -> ImageSettings:
    for d in dirs:
        if d is not None and (d / PREPROCESSOR_NAME).is_file():
            s = ImageSettings.from_file(d / PREPROCESSOR_NAME)
            break
    else:
        s = ImageSettings.clip_defaults(vision.image_size)
    s.pad_to_square = cfg.image_aspect_ratio == "pad"
    return s


def _from_dir_or_known(cfg: ParrotConfig, name: str | None, d: Path | None,
                       model_dir: Path | None) -> ResolvedTower | None:
    """A tower from its directory `d` (config and preprocessor settings), else the built-in table's `name`."""
    if d is not None:
        vc = _read_clip_dir(d)
        return ResolvedTower(vc, _image_settings(cfg, vc, d, model_dir), d, str(d))
    if name in KNOWN_VISION_TOWERS:
        vc = KNOWN_VISION_TOWERS[name]
        return ResolvedTower(vc, _image_settings(cfg, vc, model_dir), None, f"built-in {name}")
    return None


def resolve_vision_tower(
    cfg: ParrotConfig,
    model_dir: str | Path | None = None,
    override: str | Path | VisionConfig | dict | None = None,
) -> ResolvedTower:
    model_dir = Path(model_dir) if model_dir is not None else None
    if override is not None:
        if isinstance(override, VisionConfig | dict):
            vc = override if isinstance(override, VisionConfig) else VisionConfig.from_dict(override)
            return ResolvedTower(vc, _image_settings(cfg, vc, model_dir), None, "override")
        name = str(override)
        if (tower := _from_dir_or_known(cfg, name, find_tower_dir(name, None), model_dir)) is not None:
            return tower
        raise ParrotError(
            f"vision tower {_cut(name)!r}: not a directory with a CLIP config.json and not a known tower "
            f"({', '.join(KNOWN_VISION_TOWERS)})"
        )
    name = cfg.mm_vision_tower
    d = find_tower_dir(name, model_dir) if name else None
    if cfg.vision_config is not None:
        vc = cfg.vision_config
        return ResolvedTower(vc, _image_settings(cfg, vc, model_dir, d), d, "config.json vision_config")
    if (tower := _from_dir_or_known(cfg, name, d, model_dir)) is not None:
        return tower
    where = f" (looked in {model_dir} and {Path.cwd()})" if model_dir else ""
    raise ParrotError(
        f"config.json: mm_vision_tower {_cut(name)!r} does not resolve: it is not a directory with a CLIP "
        f"config.json{where} nor a known tower ({', '.join(KNOWN_VISION_TOWERS)}). Pass the tower "
        "directory with --vision-tower DIR (Python: vision_tower=DIR)."
    )
