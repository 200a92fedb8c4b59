"""``ModelManager``: the tokenizer and model a run trains, ready before the Trainer exists; and their export.

Loading (:mod:`.loading`): ``tiny:<arch>``, ``bundled:smollm2-135m-instruct``, any ``.gguf`` file
(dequantized once into a cached safetensors checkpoint), a local folder or a Hub id, with dtype,
attention kernel, revision and ``trust_remote_code`` from ``config.model``. LoRA (:mod:`.lora_targeting`):
explainable auto-targeting, explicit lists, ``all-linear``, DoRA, rsLoRA, ``modules_to_save``, QLoRA.
Export (:mod:`.export`): adapter, merged and EMA variants, a model card, and a Hub push through
``huggingface_hub.HfApi``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from hf_optcore.config import HardwareConfig, ModelConfig, TrainingConfig
from hf_optcore.errors import ModelLoadError
from hf_optcore.model_manager.cpu_memory import set_malloc_mmap_threshold
from hf_optcore.model_manager.export import (
    VARIANTS,
    is_peft_model,
    push_folder_to_hub,
    render_model_card,
    save_model_variant,
    write_text_atomic,
)
from hf_optcore.model_manager.loading import (
    BUNDLED_MODELS,
    ModelSource,
    convert_gguf,
    default_cache_root,
    resolve_source,
)
from hf_optcore.model_manager.lora_fused import fuse_lora_layers
from hf_optcore.model_manager.lora_targeting import LoRATargetError, LoRATargetReport, resolve_lora_targets

logger = logging.getLogger(__name__)


def check_chat_template(render: Callable[[list[dict]], Any], which: str) -> None:
    """Render one short conversation with ``render``, so that a chat template jinja cannot parse, or one its
    sandbox stops (an attempt to reach Python objects: nothing of it runs), is one error naming ``which`` before
    any data or weights load. A template that refuses the probe by its own checks (``raise_exception``) passes:
    each row is checked when it is encoded.

    Raises:
        ModelLoadError: the template is not valid Jinja, or the sandbox stopped it.
    """
    import jinja2

    try:
        render([{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi"}])
    except jinja2.exceptions.SecurityError as exc:
        raise ModelLoadError(f"{which}: the template tried an operation jinja's sandbox forbids "
                             f"({str(exc).rstrip('.')}); it was stopped, not run. Use a template that only formats "
                             f"the messages") from None
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise ModelLoadError(f"{which}: not a valid Jinja template (line {exc.lineno}: {exc.message})") from None
    except jinja2.exceptions.TemplateError as exc:
        logger.debug("%s: refuses the probe conversation (%s)", which, exc)

__all__ = ["LoRATargetError", "LoRATargetReport", "ModelManager", "check_chat_template", "resolve_lora_targets"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelManager:
    """Builds the tokenizer and the model to train, and exports the result.

    Args:
        model_config: the ``model`` section.
        hardware_config: the ``hardware`` section (``use_cpu``, ``use_liger_kernel``, ``torch_compile*``).
        training_config: the ``training`` section (``seed`` initialises ``tiny:`` models).
        device: where to put the model (default: leave it where it loads; the Trainer places it).
        fuse_lora: give peft's LoRA linear layers hf_optcore's fused forward (same results, fewer
            allocations; see :mod:`.lora_fused`); False keeps peft's forward.
        cpu_mmap_threshold: when the model trains on CPU, :meth:`load_model` fixes glibc's mmap threshold
            at this many bytes (e.g. ``DEFAULT_MMAP_THRESHOLD``, 1 MiB) so freed activations go back to the
            OS instead of fragmenting the heap: the peak follows the live tensors (LoRA + checkpointing on
            SmolLM2, 8 x 512 tokens: 5.7 -> 3.5 GB over 3 steps) but every large tensor is page-faulted
            afresh (steps 1.5x slower there); see :mod:`.cpu_memory`. Process-wide. Default None: the C
            library's own behaviour.

    Call :meth:`load_tokenizer` before :meth:`load_model`: a pad token the tokenizer lacked and
    had to add is what makes :meth:`load_model` resize the embeddings.
    """

    def __init__(self, model_config: ModelConfig, hardware_config: HardwareConfig | None = None,
                 training_config: TrainingConfig | None = None, device: Any = None, fuse_lora: bool = True,
                 cpu_mmap_threshold: int | None = None):
        self.config = model_config
        self.fuse_lora = fuse_lora
        self.cpu_mmap_threshold = cpu_mmap_threshold
        self.hardware = hardware_config or HardwareConfig()
        self.training = training_config or TrainingConfig()
        self.device = torch.device(device) if device is not None else None
        self.tokenizer = None
        self.added_tokens: list[str] = []
        self.lora_report: LoRATargetReport | None = None
        self._source: ModelSource | None = None

    # ---- resolution -----------------------------------------------------------------------

    @property
    def source(self) -> ModelSource:
        """``model.name_or_path`` resolved (raises ModelLoadError naming it when it cannot be found)."""
        if self._source is None:
            self._source = resolve_source(self.config.name_or_path, self.config.gguf_file, self.config.revision)
        return self._source

    def _loadable(self, source: ModelSource) -> str:
        if source.kind == "gguf":
            return str(convert_gguf(source, default_cache_root(self.config.cache_dir)))
        return source.path

    @property
    def base_model_hub_id(self) -> str | None:
        """The Hub id of the base model, when there is one (for model cards)."""
        src = self.source
        if src.kind == "hub":
            return src.name
        if src.name.startswith("bundled:"):
            return BUNDLED_MODELS[src.name.split(":", 1)[1]][2]
        return None

    def _on_cuda(self) -> bool:
        if self.device is not None:
            return self.device.type == "cuda"
        return torch.cuda.is_available() and not self.hardware.use_cpu

    def torch_dtype(self) -> torch.dtype | str:
        """The load dtype: ``model.dtype``; ``auto`` is the checkpoint's dtype on CUDA and float32 on CPU."""
        if self.config.dtype != "auto":
            return _DTYPES[self.config.dtype]
        return "auto" if self._on_cuda() and self.source.kind in ("hub", "local") else torch.float32

    # ---- tokenizer ------------------------------------------------------------------------

    def load_tokenizer(self):
        """Load the tokenizer, apply ``model.chat_template`` and make sure it has a pad token.

        A missing pad token reuses EOS; with no EOS either, ``<|pad|>`` is added (and
        :meth:`load_model` resizes the embeddings for it).
        """
        src = self.source
        if self.config.tokenizer_name_or_path:
            src = resolve_source(self.config.tokenizer_name_or_path, None, self.config.revision,
                                 what="model.tokenizer_name_or_path")
        if src.kind == "tiny":
            from hf_optcore.tiny import build_tiny_tokenizer

            tokenizer = build_tiny_tokenizer()
        else:
            from transformers import AutoTokenizer

            try:
                tokenizer = AutoTokenizer.from_pretrained(
                    self._loadable(src), revision=self.config.revision if src.kind == "hub" else None,
                    trust_remote_code=self.config.trust_remote_code)
            except (OSError, ValueError) as exc:
                raise ModelLoadError(f"model.tokenizer_name_or_path / model.name_or_path: cannot load the tokenizer "
                                     f"of {src.name!r}: {exc}") from exc
        if self.config.chat_template:
            tokenizer.chat_template = self.config.chat_template
        self._probe_chat_template(tokenizer, src.name)
        self.added_tokens = []
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is not None:
                tokenizer.pad_token = tokenizer.eos_token
                logger.info("Tokenizer has no pad token; padding with EOS %r (labels mask padding anyway)",
                            tokenizer.eos_token)
            else:
                before = len(tokenizer)
                tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
                if len(tokenizer) > before:  # not already in the vocabulary: it needs an embedding row
                    self.added_tokens.append("<|pad|>")
                logger.info("Tokenizer has neither pad nor EOS token; padding with <|pad|>%s",
                            " (a new token: embeddings will be resized)" if self.added_tokens else "")
        self.tokenizer = tokenizer
        return tokenizer

    def _probe_chat_template(self, tokenizer, name: str) -> None:
        if getattr(tokenizer, "chat_template", None):
            which = "model.chat_template" if self.config.chat_template else f"the chat template of {name!r}"
            check_chat_template(lambda conv: tokenizer.apply_chat_template(conv, tokenize=False), which)

    def require_chat_template(self, tokenizer=None) -> None:
        """Raise a ModelLoadError when chat data meets a tokenizer without a chat template."""
        tok = tokenizer if tokenizer is not None else self.tokenizer
        if tok is None or not getattr(tok, "chat_template", None):
            raise ModelLoadError(
                f"data.format=chat: the tokenizer of {self.config.name_or_path!r} has no chat template; set "
                f"model.chat_template to a Jinja template, or use data.format=instruction or text")

    # ---- model ----------------------------------------------------------------------------

    def _check_environment(self) -> None:
        from transformers.utils import is_bitsandbytes_available, is_flash_attn_2_available, is_liger_kernel_available

        if self.config.attn_implementation == "flash_attention_2" and not is_flash_attn_2_available():
            raise ModelLoadError("model.attn_implementation: 'flash_attention_2' needs the flash-attn package and a "
                                 "CUDA GPU; neither is usable here (use 'sdpa' or 'eager')")
        if self.hardware.use_liger_kernel and not is_liger_kernel_available():
            raise ModelLoadError("hardware.use_liger_kernel: true, but liger-kernel is not installed "
                                 "(pip install liger-kernel, or set it to false)")
        if self.config.lora.load_in_4bit:
            if not (torch.cuda.is_available() and is_bitsandbytes_available()):
                raise ModelLoadError("model.lora.load_in_4bit: QLoRA needs a CUDA GPU and the bitsandbytes package; "
                                     f"CUDA available: {torch.cuda.is_available()}, bitsandbytes installed: "
                                     f"{is_bitsandbytes_available()}")
            if self.source.kind == "tiny":
                raise ModelLoadError("model.lora.load_in_4bit: a tiny: model is built from config, not loaded, "
                                     "and cannot be quantized")

    def load_model(self):
        """The model ready for the Trainer: dtype, attention, new embedding rows, LoRA, checkpointing.

        Returns:
            A ``PreTrainedModel``, or a ``peft.PeftModel`` when ``model.lora.enabled``.
        """
        src = self.source
        self._check_environment()
        dtype = self.torch_dtype()
        from transformers import AutoModelForCausalLM

        if src.kind == "tiny":
            from hf_optcore.tiny import tiny_config

            torch.manual_seed(self.training.seed)
            model = AutoModelForCausalLM.from_config(tiny_config(src.tiny_arch), dtype=dtype,
                                                     attn_implementation=self.config.attn_implementation)
        else:
            kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": self.config.attn_implementation,
                                      "trust_remote_code": self.config.trust_remote_code}
            if src.kind == "hub" and self.config.revision:
                kwargs["revision"] = self.config.revision
            if self.config.lora.load_in_4bit:
                from transformers import BitsAndBytesConfig

                kwargs["quantization_config"] = BitsAndBytesConfig(
                    load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                    bnb_4bit_compute_dtype=torch.bfloat16)
            try:
                model = AutoModelForCausalLM.from_pretrained(self._loadable(src), **kwargs)
            except (OSError, ValueError, KeyError) as exc:
                raise ModelLoadError(f"model.name_or_path: cannot load model {src.name!r}: {exc}") from exc
        if self.added_tokens and self.tokenizer is not None:
            self.resize_embeddings(model, len(self.tokenizer))
        return self.prepare_model(model)

    def prepare_model(self, model):
        """Device, LoRA and activation checkpointing for a causal LM loaded here or built elsewhere.

        What :meth:`load_model` does after loading: moves ``model`` to ``device``, wraps it with LoRA
        when ``model.lora.enabled`` (fused forward, see :meth:`apply_lora`) and enables non-reentrant
        checkpointing when ``model.gradient_checkpointing``; on CPU with ``cpu_mmap_threshold`` set it
        also fixes the allocator's mmap threshold.

        Returns:
            ``model``, or the ``peft.PeftModel`` wrapping it.
        """
        if self.cpu_mmap_threshold and not self._on_cuda():
            set_malloc_mmap_threshold(self.cpu_mmap_threshold)
        if self.device is not None and not self.config.lora.load_in_4bit:
            model.to(self.device)
        if self.config.lora.enabled:
            model = self.apply_lora(model)
        if self.config.gradient_checkpointing:
            base = model.get_base_model() if self.config.lora.enabled else model
            # Non-reentrant: the reentrant variant drops gradients of LoRA weights when inputs are frozen.
            base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            base.config.use_cache = False
            if self.config.lora.enabled:
                # transformers just hooked the embeddings to make their output require grad, which only the
                # reentrant variant needs with frozen embeddings; here it would only add the backward of the
                # first block's input. (Enabled after peft wraps the model, so peft adds no second hook.)
                base.disable_input_require_grads()
        return model

    @staticmethod
    def resize_embeddings(model, new_size: int) -> None:
        """Grow the embeddings (and an untied output head) to ``new_size`` rows set to the mean row."""
        old = model.get_input_embeddings().weight.shape[0]
        if new_size <= old:
            return
        out_old = model.get_output_embeddings()
        tied = out_old is not None and out_old.weight is model.get_input_embeddings().weight
        model.resize_token_embeddings(new_size, mean_resizing=False)
        with torch.no_grad():
            emb = model.get_input_embeddings().weight
            emb[old:] = emb[:old].mean(dim=0, keepdim=True)
            head = model.get_output_embeddings()
            if head is not None and not tied and head.weight.shape[0] == new_size:
                head.weight[old:] = head.weight[:old].mean(dim=0, keepdim=True)
                if getattr(head, "bias", None) is not None:
                    head.bias[old:] = head.bias[:old].mean()
        logger.info("Resized token embeddings %d -> %d (new rows = mean embedding)", old, new_size)

    def resolve_lora_targets(self, model) -> LoRATargetReport:
        """Which modules LoRA adapts under ``model.lora.target_modules``, as a table (also logged)."""
        lora = self.config.lora
        report = resolve_lora_targets(model, lora.target_modules, rank=lora.r, use_dora=lora.use_dora)
        logger.info("%s", report.table())
        self.lora_report = report
        return report

    def apply_lora(self, model):
        """Wrap ``model`` in a peft ``PeftModel`` with the resolved targets and ``model.lora`` settings."""
        from peft import LoraConfig, get_peft_model

        lora = self.config.lora
        report = self.resolve_lora_targets(model)
        names = [n for n, _ in model.named_modules()]
        for m in lora.modules_to_save:
            if not any(n == m or n.endswith("." + m) for n in names):
                raise LoRATargetError(f"model.lora.modules_to_save: {m!r} matches no module of {type(model).__name__}")
        if lora.load_in_4bit:
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=self.config.gradient_checkpointing,
                gradient_checkpointing_kwargs={"use_reentrant": False})
        dropout = lora.dropout
        if report.parameter_names and dropout > 0:
            # peft's ParamWrapper (fused 3-D expert weights) has no dropout; the default must still work.
            logger.warning("model.lora.dropout=%s ignored: LoRA on fused MoE expert weights (%s) supports no "
                           "dropout, so the whole adapter uses 0", dropout, report.rows[-1].pattern)
            dropout = 0.0
        peft_config = LoraConfig(
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=dropout, bias=lora.bias, task_type="CAUSAL_LM",
            target_modules=report.target_modules, target_parameters=report.target_parameters,
            modules_to_save=list(lora.modules_to_save) or None, use_dora=lora.use_dora, use_rslora=lora.use_rslora,
            fan_in_fan_out=any(row.kind == "Conv1D" for row in report.rows))  # GPT-2 stores weights in x out
        try:
            model = get_peft_model(model, peft_config)
        except (ValueError, TypeError, NotImplementedError) as exc:
            raise LoRATargetError(f"model.lora: peft cannot apply these settings to {type(model).__name__}: {exc}") from exc
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        fused = fuse_lora_layers(model) if self.fuse_lora else 0
        logger.info("LoRA applied: %s trainable parameters of %s; %d layers with the fused LoRA forward",
                    f"{trainable:,}", f"{report.total_params:,}", fused)
        return model

    def compile_model(self, model):
        """``torch.compile`` with ``hardware.torch_compile_mode`` for loops outside the Trainer.

        The Trainer compiles itself when ``hardware.torch_compile`` is set. Either way, keep
        ``data.pad_to_multiple_of`` set so batches come in a few lengths and compiled graphs are
        reused instead of recompiled per batch.
        """
        return torch.compile(model, mode=self.hardware.torch_compile_mode)

    # ---- export ---------------------------------------------------------------------------

    def save_final(self, model, tokenizer, output_dir: str | Path, variant: str = "adapter") -> Path:
        """Save ``model`` as ``adapter``, ``merged`` or ``ema`` (a model or the EMA folder) into ``output_dir``."""
        out = save_model_variant(model, tokenizer, output_dir, variant)
        if self.added_tokens and is_peft_model(model) and variant != "merged":
            # The adapter alone cannot rebuild rows the base checkpoint lacks: store the embeddings too.
            model.save_pretrained(out, save_embedding_layers=True)
        # Replaces peft's placeholder card; the recipe rewrites it with metrics via write_model_card.
        self.write_model_card(out, variant=variant)
        logger.info("Saved %s model to %s", variant, out)
        return out

    def write_model_card(self, output_dir: str | Path, metrics: dict | None = None, config: Any = None,
                         data_description: str | None = None, variant: str | None = None) -> Path:
        """Write ``README.md`` (base model, data, config, metrics, hf_optcore version) into ``output_dir``."""
        out = Path(output_dir)
        if variant is None:
            variant = "adapter" if (out / "adapter_config.json").is_file() else "merged"
        library = "peft" if (out / "adapter_config.json").is_file() else "transformers"
        text = render_model_card(
            base_model=self.config.name_or_path, base_model_hub_id=self.base_model_hub_id, variant=variant,
            library=library, config=config, metrics=metrics, data_description=data_description,
            lora_table=self.lora_report.table() if self.lora_report else None)
        write_text_atomic(out / "README.md", text)
        return out / "README.md"

    def push_to_hub(self, output_dir_or_model, repo_id: str, variant: str = "adapter", token: str | None = None,
                    private: bool | None = None, commit_message: str | None = None, tokenizer=None,
                    ignore_patterns: list[str] | None = None, **card: Any):
        """Upload an exported folder (or a model, exported first) to the Hub through ``huggingface_hub.HfApi``.

        Args:
            output_dir_or_model: a folder written by :meth:`save_final` (for ``ema``, the run folder
                whose ``ema/`` sub-folder the EMA helper wrote also works), or a model.
            repo_id: ``owner/name``.
            variant: ``adapter``, ``merged`` or ``ema``.
            token: Hub token (else huggingface_hub's login); given to ``HfApi`` only, never logged or saved.
            private: create the repository private.
            commit_message: the commit message.
            tokenizer: saved with a model argument (default: the one :meth:`load_tokenizer` returned).
            ignore_patterns: files of the folder not uploaded (``["*/*"]``: top-level files only).
            **card: ``metrics``, ``config``, ``data_description`` for the model card written when
                the folder has none.
        """
        import tempfile

        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
        if isinstance(output_dir_or_model, (str, Path)):
            folder = Path(output_dir_or_model)
            if variant == "ema" and (folder / "ema").is_dir():
                folder = folder / "ema"
            if not folder.is_dir():
                raise FileNotFoundError(f"push_to_hub: {str(folder)!r} is not a folder")
            card_path = folder / "README.md"
            if card or not card_path.is_file() or "hf_optcore version" not in card_path.read_text(errors="ignore"):
                self.write_model_card(folder, variant=variant, **card)
            return push_folder_to_hub(folder, repo_id, token=token, private=private, commit_message=commit_message,
                                      ignore_patterns=ignore_patterns)
        with tempfile.TemporaryDirectory(prefix="hf_optcore_push_") as tmp:
            self.save_final(output_dir_or_model, tokenizer if tokenizer is not None else self.tokenizer, tmp, variant)
            self.write_model_card(tmp, variant=variant, **card)
            return push_folder_to_hub(tmp, repo_id, token=token, private=private, commit_message=commit_message)
