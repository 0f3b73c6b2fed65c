"""The tensor interfaces of the four Triton models (names, dtypes, shapes, meanings).

One source for the generator (config.pbtxt), the model code and the repository README. The `nemovl`
entry interface is fixed by docs/interfaces.md (section triton).
"""

from __future__ import annotations

from nemovl_trt.triton.pbtxt import TensorSpec

ENTRY_MODEL = "nemovl"
PREPROCESSOR_MODEL = "preprocessor"
VISION_MODEL = "vision_encoder"
LLM_MODEL = "llm"
MODEL_NAMES = (ENTRY_MODEL, PREPROCESSOR_MODEL, VISION_MODEL, LLM_MODEL)

# ---- nemovl (entry; decoupled; max_batch_size 0) ----
NEMOVL_INPUTS = (
    TensorSpec("messages", "BYTES", (1,), "JSON list of chat messages; content parts reference media by "
               'index: {"type":"text","text":...}, {"type":"image","index":i}, {"type":"video","index":0}'),
    TensorSpec("images", "BYTES", (-1,), "encoded image bytes (JPEG/PNG/WEBP), one element per image",
               optional=True),
    TensorSpec("video", "BYTES", (1,), "encoded video bytes (MP4/MOV/WEBM)", optional=True),
    TensorSpec("tools", "BYTES", (1,), "JSON list of OpenAI tool definitions", optional=True),
    TensorSpec("params", "BYTES", (1,), "JSON object: max_tokens, temperature, top_p, top_k, seed, stop "
               "(list of str), max_num_tiles, fps, num_frames, video_pruning_rate, ignore_eos, n, "
               "frequency_penalty, presence_penalty, repetition_penalty, logit_bias ({id: bias}), logprobs "
               "(int: alternatives per token), prompt_logprobs, guided (structured-output spec, docs/api.md)",
               optional=True),
    TensorSpec("prompt", "BYTES", (1,), "JSON string or list of token ids: a raw prompt used instead of the "
               "chat template (/v1/completions; send messages as [])", optional=True),
)
NEMOVL_OUTPUTS = (
    TensorSpec("text", "BYTES", (1,), "new text since the previous response (complete UTF-8 characters only)"),
    TensorSpec("token_ids", "INT64", (-1,), "the token ids produced since the previous response"),
    TensorSpec("finish_reason", "BYTES", (1,), '"" while streaming; then "stop", "length" or "cancelled"'),
    TensorSpec("prompt_tokens", "INT32", (1,), "prompt length after image/video expansion (and EVS)"),
    TensorSpec("completion_tokens", "INT32", (1,), "tokens generated so far"),
    TensorSpec("info", "BYTES", (1,), "JSON (first response only, \"\" after): warnings, images, tiles, "
               "frames, evs_pruned_tokens, reasoning"),
    TensorSpec("index", "INT32", (1,), "the choice these outputs belong to (0 … n-1); text, token_ids, "
               "finish_reason and completion_tokens are per choice"),
    TensorSpec("logprobs", "BYTES", (1,), 'JSON ("" unless asked): {"content": [{"token_id", "token", "bytes", '
               '"logprob", "top_logprobs": [...]}], "prompt": [...] (first response, when asked)}'),
)

# ---- preprocessor (Python, KIND_CPU; max_batch_size 0) ----
PREPROCESSOR_INPUTS = NEMOVL_INPUTS
PREPROCESSOR_OUTPUTS = (
    TensorSpec("input_ids", "INT64", (-1,), "prompt token ids with image/video placeholders expanded"),
    TensorSpec("pixel_values", "FP32", (-1, 3, -1, -1), "normalized tiles of all images (tiling order, "
               "thumbnail last) or the video frames; 0 rows for text-only"),
    TensorSpec("info", "BYTES", (1,), "JSON: tiles per image, frames, timestamps, warnings, reasoning, "
               "resolved sampling parameters"),
)

# ---- vision_encoder (dynamic batching; the batch dimension is implicit) ----
VISION_INPUT = "pixel_values"
VISION_OUTPUT = "embeddings"


TORCH_TO_TRITON_DTYPE = {"float32": "FP32", "float16": "FP16", "bfloat16": "BF16"}


def vision_tensors(image_size: int, tokens_per_tile: int, hidden: int,
                   input_name: str = VISION_INPUT, output_name: str = VISION_OUTPUT,
                   input_dtype: str = "float32", output_dtype: str = "float32",
                   ) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """Vision encoder tensors for a checkpoint: tiles [3,S,S] → projected embeddings [P,hidden]
    (dtypes as the built graph declares them: "float32" | "float16" | "bfloat16")."""
    return ((TensorSpec(input_name, TORCH_TO_TRITON_DTYPE[input_dtype], (3, image_size, image_size),
                        "normalized 512×512 tiles"),),
            (TensorSpec(output_name, TORCH_TO_TRITON_DTYPE[output_dtype], (tokens_per_tile, hidden),
                        "projected LLM-space embeddings per tile"),))


# ---- llm (decoupled; max_batch_size 0; same names on every target) ----
LLM_INPUTS = (
    TensorSpec("input_ids", "INT64", (-1,), "prompt token ids"),
    TensorSpec("mm_embeddings", "FP32", (-1, -1), "embeddings that replace the image-context "
               "placeholder ids in order [n_placeholders, hidden]", optional=True),
    TensorSpec("sampling", "BYTES", (1,), "JSON: max_new_tokens, temperature, top_p, top_k, seed, "
               "stop_token_ids, ignore_eos, n, frequency_penalty, presence_penalty, repetition_penalty, "
               "logit_bias, logprobs, prompt_logprobs, guided", optional=True),
    TensorSpec("request_id", "BYTES", (1,), "id used by a later control cancel", optional=True),
    TensorSpec("control", "BYTES", (1,), 'JSON control message instead of a generation: {"op":"cancel",'
               '"request_id":..., "index"?: choice} or {"op":"stats"}', optional=True),
)
LLM_OUTPUTS = (
    TensorSpec("token_ids", "INT64", (-1,), "token ids generated since the previous response"),
    TensorSpec("finish_reason", "BYTES", (1,), '"" while generating; "stop", "length" or "cancelled"'),
    TensorSpec("info", "BYTES", (1,), "JSON answer of a control message (\"\" for generation responses)"),
    TensorSpec("index", "INT32", (1,), "the choice the token ids belong to (0 … n-1)"),
    TensorSpec("logprobs", "BYTES", (1,), 'JSON ("" unless asked): {"tokens": [[logprob, [[id, logprob], ...]], '
               '...] aligned with token_ids, "prompt": [...] (first response, when asked)}'),
)

# Model-config parameters of `nemovl` read by the OpenAI frontend (docs/interfaces.md).
NEMOVL_PUBLIC_PARAMETERS = ("model_id", "target", "max_seq_len", "max_num_tiles", "max_images",
                            "max_video_frames", "llm_precision", "vision_precision", "video_pruning_rate")
ENGINES_DIR_PARAMETER = "engines_dir"
