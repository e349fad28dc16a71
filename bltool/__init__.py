"""bltool: Budgeted LoRA distillation, from a teacher LM to a student that is cheaper to serve."""

import wrapt

__version__ = "0.1.0"

# Compressed students have their own model types (bltool/adapt/lowrank_models.py). Register them with
# transformers' Auto classes as soon as transformers is imported (at once if it already is), so that
# `import bltool` is all `AutoModelForCausalLM.from_pretrained(compressed_dir)` needs, while
# `import bltool` itself (and `bltool --help`) stays free of torch and transformers.
wrapt.register_post_import_hook("bltool.adapt.lowrank_models:register", "transformers")


def load_model(path, dtype=None, device: str = "cpu"):
    """Load any model bltool can name as a `transformers` causal LM, in eval mode.

    `path` is a Hugging Face checkpoint directory, a `.gguf` file, an alias, or a bltool student
    (built, distilled or compressed; compressed modules stay compressed, so `generate()` and
    lm-evaluation-harness's Hugging Face wrapper run the fast form). `dtype` is a torch dtype, a name
    ("float32", "bfloat16", "float16") or None for the checkpoint's own.
    """
    from bltool.models.devices import resolve_dtype
    from bltool.models.loading import load_model as _load
    from bltool.models.loading import resolve_model

    if isinstance(dtype, str):
        dtype = resolve_dtype(dtype, device)
    return _load(resolve_model(str(path), flag="path"), dtype=dtype, device=device, flag=str(path))
