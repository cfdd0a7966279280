"""Model intake: what `--model` names, and the one reader of a checkpoint's config.

``--model`` takes a registered name (``tiny-moe``), a checkpoint directory (config.json
with sharded safetensors and ``model.safetensors.index.json``, or one file), a
config.json, a ``.gguf`` file, or a Hugging Face id (``Qwen/Qwen3-30B-A3B``) found
**offline** in the local Hugging Face cache (``HF_HUB_CACHE``, else ``HF_HOME/hub``,
else ``~/.cache/huggingface/hub``; the snapshot the ``main`` ref points to, or
``--revision``). Nothing is ever downloaded. The model's name is the id, the
directory's name or the file's stem, never a snapshot hash.

Configs are read through one alias table (:func:`normalize`) so a checkpoint saved by
any transformers version reads the same: transformers 5 writes ``num_local_experts``,
``rope_parameters`` and ``dtype`` where 4.x wrote ``num_experts``, ``rope_theta`` and
``torch_dtype``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from capbench_core.contract.backend import ModelRef
from capbench_core.contract.registry import PluginManager
from capbench_core.errors import CapbenchError

#: model_type -> the key capbench reads the routed-expert count from (the other spellings are aliases).
EXPERT_KEY = {"qwen2_moe": "num_experts", "qwen3_moe": "num_experts", "olmoe": "num_experts",
              "mixtral": "num_local_experts", "phimoe": "num_local_experts", "gpt_oss": "num_local_experts",
              "deepseek_v2": "n_routed_experts", "deepseek_v3": "n_routed_experts"}
EXPERT_ALIASES = ("num_experts", "num_local_experts", "n_routed_experts")
SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F8_E4M3": "fp8", "F8_E5M2": "fp8",
                      "I8": "int8", "U8": "uint8", "I32": "int32", "I64": "int64", "F64": "float64"}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def normalize(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config with the fields capbench reads under the names it reads them by, whichever transformers
    version wrote it; the original fields stay."""
    out = dict(config)
    if out.get("torch_dtype") is None and out.get("dtype") is not None:
        out["torch_dtype"] = out["dtype"]
    rope = out.get("rope_parameters")
    if isinstance(rope, Mapping):
        if out.get("rope_theta") is None and rope.get("rope_theta") is not None:
            out["rope_theta"] = rope["rope_theta"]
        if out.get("rope_scaling") is None and rope.get("rope_type", "default") != "default":
            out["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    key = EXPERT_KEY.get(str(out.get("model_type")))
    if key and out.get(key) is None:
        given = [out[k] for k in EXPERT_ALIASES if out.get(k) is not None]
        if given:
            out[key] = given[0]
    if out.get("num_experts_per_tok") is None and out.get("experts_per_token") is not None:
        out["num_experts_per_tok"] = out["experts_per_token"]
    return out


def read_config(path: Path) -> dict[str, Any]:
    """config.json of a model directory (or the file itself), normalised, with errors naming the file."""
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise CapbenchError(f"{file} is missing: pass a model name, a model directory (with its config.json) or a "
                            f"config.json")
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise CapbenchError(f"{file} is not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(data, dict):
        raise CapbenchError(f"{file} must contain a JSON object")
    return normalize(data)


def hub_caches() -> list[Path]:
    """Where Hugging Face caches live, in the order huggingface_hub looks."""
    found = [os.environ.get("HF_HUB_CACHE"), os.environ.get("HUGGINGFACE_HUB_CACHE")]
    home = os.environ.get("HF_HOME") or str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
                                            / "huggingface")
    found.append(str(Path(home) / "hub"))
    return list(dict.fromkeys(Path(p) for p in found if p))


def hub_snapshot(repo_id: str, revision: str | None = None) -> Path:
    """The local snapshot of ``repo_id`` at ``revision`` (a ref such as ``main``, or a commit), from the cache
    only; an error says where it looked."""
    rev = revision or "main"
    folder_name = "models--" + repo_id.replace("/", "--")
    for cache in hub_caches():
        folder = cache / folder_name
        if not folder.is_dir():
            continue
        ref = folder / "refs" / rev
        commit = ref.read_text().strip() if ref.is_file() else rev
        snapshot = folder / "snapshots" / commit
        if snapshot.is_dir():
            return snapshot
        refs = ", ".join(sorted(p.name for p in (folder / "refs").glob("*"))) or "none"
        raise CapbenchError(f"{repo_id} is in the Hugging Face cache at {folder}, but not at revision {rev!r} "
                            f"(refs there: {refs}; snapshots: {len(list((folder / 'snapshots').glob('*')))})")
    looked = ", ".join(str(c) for c in hub_caches())
    raise CapbenchError(f"{repo_id} is not in the local Hugging Face cache (looked in {looked}; set HF_HOME or "
                        f"HF_HUB_CACHE if yours is elsewhere). capbench downloads nothing: fetch it with "
                        f"`huggingface-cli download {repo_id}` where there is network, or pass a checkpoint directory")


def model_ref(pm: PluginManager, name: str, revision: str | None = None) -> ModelRef:
    """What ``--model NAME`` means: a registered model, a path (directory, config.json or .gguf), or a Hugging
    Face id in the local cache."""
    path = Path(name).expanduser()
    if name in pm.models.names() and not revision:
        return pm.models.get(name)
    if path.exists():
        return _local(path)
    if HUB_ID.match(name) and not name.startswith(("./", "../")):
        return ModelRef(name=name, path=hub_snapshot(name, revision),
                        description=f"Hugging Face {name} at {revision or 'main'} (local cache)")
    return pm.models.get(name)


def _local(path: Path) -> ModelRef:
    path = path.resolve()
    if path.is_file() and path.suffix == ".gguf":
        return ModelRef(name=path.stem, path=path, description="GGUF file")
    directory = path.parent if path.is_file() else path
    label = path.stem if path.is_file() and path.stem != "config" else directory.name
    return ModelRef(name=label, path=directory)


def max_context(model: ModelRef) -> int | None:
    """The checkpoint's own context limit (``max_position_embeddings``), if it states one."""
    if model.path.suffix == ".gguf":
        return None
    try:
        value = read_config(model.path).get("max_position_embeddings")
    except CapbenchError:
        return None
    return int(value) if value else None


def is_gguf(model: ModelRef) -> bool:
    return model.path.suffix == ".gguf" and model.path.is_file()


def weight_files(directory: Path) -> list[Path]:
    """The safetensors shards of a checkpoint: those its index names (in order), else every *.safetensors."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            mapping = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as exc:
            raise CapbenchError(f"{index} is not a safetensors index ({exc})") from None
        return [directory / f for f in dict.fromkeys(mapping.values())]
    return sorted(directory.glob("*.safetensors"))


def safetensors_header(file: Path) -> dict[str, Any]:
    """A shard's header (tensor names, dtypes, shapes, offsets) without reading its tensors."""
    try:
        with open(file, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if size > file.stat().st_size - 8:
                raise ValueError(f"its header length {size} runs past the end of the file")
            header: dict[str, Any] = json.loads(f.read(size))
    except (OSError, ValueError) as exc:
        raise CapbenchError(f"{file} is not a readable safetensors file ({exc})") from None
    if not isinstance(header, dict):
        raise CapbenchError(f"{file} is not a readable safetensors file (its header is not a JSON object)")
    return header


def stored_dtype(directory: Path) -> str | None:
    """The dtype most of a checkpoint's weight bytes are stored in (from the shards' headers), None when there
    are no safetensors shards."""
    totals: dict[str, int] = {}
    for file in weight_files(directory):
        for name, info in safetensors_header(file).items():
            if name == "__metadata__":
                continue
            start, end = info["data_offsets"]
            dtype = SAFETENSORS_DTYPES.get(info["dtype"], info["dtype"].lower())
            totals[dtype] = totals.get(dtype, 0) + end - start
    return max(totals, key=lambda k: totals[k]) if totals else None


def checkpoint_key(directory: Path) -> str:
    """A cache key for what was made from a checkpoint (a GGUF): its config, and each shard's name, size and
    modification time (or the index file's) — never a re-hash of gigabytes at every start."""
    import hashlib

    parts = [(directory / "config.json").read_text() if (directory / "config.json").is_file() else ""]
    for file in [directory / "model.safetensors.index.json", *weight_files(directory),
                 *sorted(directory.glob("tokenizer*"))]:
        if file.is_file():
            stat = file.stat()
            parts.append(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


class ChatTemplate:
    """A checkpoint's chat template (``chat_template.jinja``, ``tokenizer_config.json``'s ``chat_template``, or a
    GGUF's ``tokenizer.chat_template``), rendered the way transformers' ``apply_chat_template`` renders it: one
    user message, the generation prompt added. In-process engines send what this renders; servers apply their
    own copy of the same template (``/v1/chat/completions``)."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = ""):
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
        self.template = env.from_string(source)
        self.bos_token, self.eos_token = bos_token, eos_token

    def render(self, user_text: str) -> str:
        return self.template.render(messages=[{"role": "user", "content": user_text}], add_generation_prompt=True,
                                    bos_token=self.bos_token, eos_token=self.eos_token)

    @classmethod
    def of(cls, path: Path) -> ChatTemplate | None:
        """The template of a checkpoint directory or GGUF file, None when it has none."""
        if path.suffix == ".gguf":
            return cls._of_gguf(path)
        config = {}
        if (path / "tokenizer_config.json").is_file():
            config = json.loads((path / "tokenizer_config.json").read_text())
        source = config.get("chat_template")
        if isinstance(source, list):  # named templates: the default one
            source = next((t.get("template") for t in source if t.get("name") == "default"), None)
        if not source and (path / "chat_template.jinja").is_file():
            source = (path / "chat_template.jinja").read_text()
        if not source:
            return None
        return cls(str(source), _token_text(config.get("bos_token")), _token_text(config.get("eos_token")))

    @classmethod
    def _of_gguf(cls, path: Path) -> ChatTemplate | None:
        import gguf

        fields = gguf.GGUFReader(str(path)).fields
        if "tokenizer.chat_template" not in fields:
            return None
        tokens = fields["tokenizer.ggml.tokens"].contents() if "tokenizer.ggml.tokens" in fields else []

        def token(key: str) -> str:
            return str(tokens[int(fields[key].contents())]) if key in fields and tokens else ""

        return cls(str(fields["tokenizer.chat_template"].contents()), token("tokenizer.ggml.bos_token_id"),
                   token("tokenizer.ggml.eos_token_id"))


def chat_template(path: Path) -> ChatTemplate:
    """The checkpoint's chat template, or an error saying it has none (its requests cannot be chat requests)."""
    found = ChatTemplate.of(path)
    if found is None:
        raise CapbenchError(f"{path} has no chat template (chat_template.jinja, tokenizer_config.json's "
                            f"chat_template, or a GGUF's tokenizer.chat_template): run it without chat")
    return found


def _token_text(value: Any) -> str:
    """A special token as tokenizer_config.json writes it: text, or an AddedToken dict."""
    if isinstance(value, Mapping):
        return str(value.get("content") or "")
    return str(value or "")


#: architecture class names transformers 5 writes -> the spelling engines register them under
ENGINE_ARCHITECTURES = {"PhimoeForCausalLM": "PhiMoEForCausalLM"}


def engine_view(directory: Path) -> Path:
    """The checkpoint as engines can read it. Engines pick their model class by ``architectures``, and
    transformers 5 renamed some classes (``PhiMoEForCausalLM`` is ``PhimoeForCausalLM`` when it saves):
    for such a checkpoint, a directory of links to its files with that one name spelled as engines know it
    (made once under the user cache); any other checkpoint is served as it is."""
    file = directory / "config.json"
    if not file.is_file():
        return directory
    config = json.loads(file.read_text())
    archs = [str(a) for a in config.get("architectures") or []]
    renamed = [ENGINE_ARCHITECTURES.get(a, a) for a in archs]
    if renamed == archs:
        return directory
    from platformdirs import user_cache_dir

    view = Path(user_cache_dir("capbench")) / "checkpoint-views" / f"{directory.name}-{checkpoint_key(directory)}"
    if not (view / "config.json").is_file():
        view.mkdir(parents=True, exist_ok=True)
        for item in directory.iterdir():
            link = view / item.name
            if item.name != "config.json" and not link.exists():
                link.symlink_to(item.resolve())
        (view / "config.json").write_text(json.dumps({**config, "architectures": renamed}, indent=2))
    return view
