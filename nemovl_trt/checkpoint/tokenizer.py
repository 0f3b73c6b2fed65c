"""Tokenizer files of a checkpoint: loading (`load_tokenizer`), the chat template (`render_chat`) and the
small byte-level BPE of the tiny checkpoints (`train_tiny_tokenizer`).

The tiny tokenizer copies the *layout* of the Nemotron-H tokenizer — `<unk>`=0, `<s>`=1, `</s>`=2, then
control slots `<SPECIAL_3>`…`<SPECIAL_k>` (so `<SPECIAL_10>`/`<SPECIAL_11>`/`<SPECIAL_12>` of the chat
format exist), then the BPE vocabulary — and appends the VL / reasoning / tool tokens after the BPE
vocabulary, as the 12B does after its 131072 base entries. Their ids therefore differ from the 12B's on
purpose: code must read them from the files.
"""

from __future__ import annotations

import functools
import json
import random
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from nemovl_trt.checkpoint.config import CheckpointError, read_json

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
GENERATION_CONFIG_FILE = "generation_config.json"

# ---- the tiny tokenizer's layout ----------------------------------------------------------------------
UNK, BOS, EOS = "<unk>", "<s>", "</s>"
TURN_END = "<SPECIAL_12>"  # end of an assistant turn: the stop token of the chat format
NUM_CONTROL_SLOTS = 20  # ids 0..19: <unk>, <s>, </s>, <SPECIAL_3> … <SPECIAL_19>
TINY_BPE_VOCAB = 1500  # byte alphabet + merges + the control slots
# Added after the BPE vocabulary, in this order (the 12B has <image>, <img>, </img> first as well).
VL_TOKENS = ("<image>", "<img>", "</img>", "<video>", "<think>", "</think>", "<TOOLCALL>", "</TOOLCALL>",
             "<AVAILABLE_TOOLS>", "</AVAILABLE_TOOLS>", "<TOOL_RESPONSE>", "</TOOL_RESPONSE>")
CORPUS_SENTENCES = 6000


def control_tokens() -> list[str]:
    """`<unk>`, `<s>`, `</s>`, `<SPECIAL_3>` … `<SPECIAL_{NUM_CONTROL_SLOTS-1}>` (ids 0…NUM_CONTROL_SLOTS-1)."""
    return [UNK, BOS, EOS] + [f"<SPECIAL_{i}>" for i in range(3, NUM_CONTROL_SLOTS)]


def default_chat_template() -> str:
    """The packaged Nemotron chat template (`chat_template.jinja` next to this module)."""
    return resources.files("nemovl_trt.checkpoint").joinpath(CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")


# ---- rendering the chat template ------------------------------------------------------------------------
def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    """HF's `tojson` filter (plain json.dumps; jinja's own escapes HTML and sorts keys)."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


@functools.lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    return env.from_string(template)


def render_chat(template: str, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                add_generation_prompt: bool = True, **extra: Any) -> str:
    """Render OpenAI-style `messages` (content: str or list of parts) with a chat template, in the same
    sandboxed jinja environment as HF `apply_chat_template`. Raises `ValueError` for a template error
    (e.g. an unsupported role or content part)."""
    try:
        return _compile(template).render(messages=messages, tools=tools or None,
                                         add_generation_prompt=add_generation_prompt, **extra)
    except jinja2.exceptions.TemplateError as e:
        raise ValueError(f"chat template error: {e}") from None


# ---- the bundle -----------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class TokenizerBundle:
    """A checkpoint's tokenizer: the fast BPE, its chat template and its special-token ids.
    Compared and hashed by identity (usable as a cache key)."""

    tokenizer: Tokenizer = field(compare=False, repr=False)
    chat_template: str = field(repr=False)
    special: dict[str, int]  # every added/special string -> id, e.g. "<image>", "<SPECIAL_12>"
    bos_id: int | None
    eos_ids: tuple[int, ...]
    model_max_length: int | None = None

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (BPE vocabulary + added tokens)."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int:
        """Id of one token string (special or regular); CheckpointError if it is not a single token."""
        tid = self.tokenizer.token_to_id(token)
        if tid is None:
            raise CheckpointError(f"the tokenizer has no single token '{token}'.")
        return tid

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` without BOS/EOS wrapping; special strings inside (e.g. `<img>`) become
        their single ids."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids` (byte-level BPE; exact inverse of `encode` on whole sequences)."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
               add_generation_prompt: bool = True) -> str:
        """`render_chat` with this tokenizer's template."""
        return render_chat(self.chat_template, messages, tools=tools, add_generation_prompt=add_generation_prompt)


def _token_content(tok: Any) -> str | None:
    if isinstance(tok, str):
        return tok
    if isinstance(tok, dict) and isinstance(tok.get("content"), str):
        return tok["content"]
    return None


def _read_chat_template(ckpt: Path, tok_cfg: dict[str, Any]) -> str:
    jinja_path = ckpt / CHAT_TEMPLATE_FILE
    if jinja_path.is_file():  # transformers >= 4.43 writes the template to its own file; it wins there too
        return jinja_path.read_text(encoding="utf-8")
    tmpl = tok_cfg.get("chat_template")
    if isinstance(tmpl, list):  # [{"name": ..., "template": ...}] form
        named = {t.get("name"): t.get("template") for t in tmpl if isinstance(t, dict)}
        tmpl = named.get("default")
    if not isinstance(tmpl, str) or not tmpl:
        raise CheckpointError(f"{ckpt / TOKENIZER_CONFIG_FILE} has no chat_template (and there is no "
                              f"{CHAT_TEMPLATE_FILE}).")
    return tmpl


def _eos_ids(ckpt: Path, tok_cfg: dict[str, Any], tok: Tokenizer) -> tuple[int, ...]:
    ids: list[int] = []
    gen_path = ckpt / GENERATION_CONFIG_FILE
    if gen_path.is_file():
        eos = read_json(gen_path).get("eos_token_id")
        ids += [eos] if isinstance(eos, int) else [int(e) for e in (eos or [])]
    eos_tok = _token_content(tok_cfg.get("eos_token"))
    if eos_tok is not None:
        tid = tok.token_to_id(eos_tok)
        if tid is None:
            raise CheckpointError(f"{ckpt / TOKENIZER_CONFIG_FILE} eos_token '{eos_tok}' is not in "
                                  f"{TOKENIZER_FILE}.")
        ids.append(tid)
    return tuple(dict.fromkeys(ids))


def load_tokenizer(ckpt_dir: str | Path) -> TokenizerBundle:
    """Load `tokenizer.json` + `tokenizer_config.json` (+ `chat_template.jinja`, and
    `generation_config.json` for the stop ids when present) from a checkpoint or tokenizer directory.

    eos_ids = generation_config.json `eos_token_id` (int or list) followed by tokenizer_config's eos_token,
    without duplicates.
    """
    ckpt = Path(ckpt_dir)
    tok_path = ckpt / TOKENIZER_FILE
    if not tok_path.is_file():
        raise CheckpointError(f"{TOKENIZER_FILE} is missing from {ckpt}.")
    try:
        tok = Tokenizer.from_file(str(tok_path))
    except Exception as e:  # the Rust error type is not exported
        raise CheckpointError(f"{tok_path} is not a valid tokenizers file ({e}).") from None
    tok_cfg = read_json(ckpt / TOKENIZER_CONFIG_FILE)
    special = {t.content: i for i, t in sorted(tok.get_added_tokens_decoder().items())}
    bos_tok = _token_content(tok_cfg.get("bos_token"))
    bos_id = tok.token_to_id(bos_tok) if bos_tok is not None else None
    max_len = tok_cfg.get("model_max_length")
    return TokenizerBundle(
        tokenizer=tok,
        chat_template=_read_chat_template(ckpt, tok_cfg),
        special=special,
        bos_id=bos_id,
        eos_ids=_eos_ids(ckpt, tok_cfg, tok),
        model_max_length=int(max_len) if isinstance(max_len, int | float) and max_len < 1e12 else None,
    )


# ---- training the tiny tokenizer -----------------------------------------------------------------------
_COLOURS = ["red", "green", "blue", "yellow", "orange", "purple", "pink", "brown", "black", "white", "gray",
            "grey", "cyan", "magenta", "violet", "gold", "silver", "navy", "teal", "maroon", "olive", "beige"]
_SHAPES = ["square", "circle", "triangle", "rectangle", "star", "hexagon", "pentagon", "oval", "diamond",
           "line", "dot", "cross", "arrow", "heart", "ring", "cube", "sphere", "box", "shape", "object"]
_NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                 "eleven", "twelve", "twenty", "hundred", "first", "second", "third", "fourth", "last"]
_NOUNS = ["image", "picture", "photo", "video", "frame", "clip", "scene", "document", "page", "table",
          "chart", "graph", "receipt", "invoice", "total", "price", "date", "name", "number", "text",
          "title", "label", "row", "column", "cell", "value", "answer", "question", "color", "colour",
          "background", "foreground", "corner", "center", "middle", "side", "edge", "top", "bottom", "left",
          "right", "cat", "dog", "car", "tree", "house", "person", "people", "sky", "water", "road", "sign",
          "street", "city", "weather", "temperature", "time", "seconds", "minutes", "hours", "day", "week",
          "year", "tool", "function", "result", "response", "user", "assistant", "system", "model", "word",
          "letter", "item", "list", "group", "pattern", "grid", "tile", "pixel", "size", "width", "height"]
_VERBS = ["is", "are", "was", "were", "has", "have", "shows", "contains", "moves", "appears", "changes",
          "describe", "count", "find", "read", "tell", "explain", "list", "compare", "identify", "call",
          "return", "use", "see", "look", "think", "answer", "sampled", "located", "placed", "drawn"]
_ADJ = ["big", "small", "large", "tiny", "bright", "dark", "light", "left", "right", "upper", "lower",
        "same", "different", "empty", "full", "new", "old", "main", "other", "next", "previous", "final"]
_FUNCTION_WORDS = ["the", "a", "an", "of", "in", "on", "at", "to", "from", "with", "and", "or", "but", "not",
                   "this", "that", "these", "those", "there", "here", "what", "which", "where", "when", "who",
                   "why", "how", "many", "much", "each", "every", "all", "some", "any", "no", "yes", "it",
                   "its", "you", "your", "we", "they", "please", "only", "then", "than", "after", "before"]
_SUFFIXES = ["", "", "", "s", "ed", "ing", "er", "ly"]
_TOOLS = ["get_weather", "count_objects", "search", "lookup_price", "convert_units", "get_time"]


def _corpus(seed: int, n_sentences: int = CORPUS_SENTENCES) -> list[str]:
    """A deterministic English corpus for the tiny BPE: questions and answers about colours, shapes,
    counts, video frames and timestamps, plus tool-call JSON."""
    rng = random.Random(seed)
    pick = rng.choice

    def noun_phrase() -> str:
        return f"{pick(['the', 'a', 'one', 'each'])} {pick(_ADJ)} {pick(_COLOURS)} {pick(_SHAPES)}"

    def sentence() -> str:
        kind = rng.randrange(10)
        n = rng.randrange(0, 100)
        if kind == 0:
            return f"How many {pick(_COLOURS)} {pick(_SHAPES)}s are in the {pick(_NOUNS)}? There are {n}."
        if kind == 1:
            return (f"Which {pick(_SHAPES)} is {pick(_COLOURS)}: the {pick(_ADJ)} one or the "
                    f"{pick(_ADJ)} one? The {pick(['left', 'right', 'top', 'bottom'])} one.")
        if kind == 2:
            t = rng.randrange(0, 6000) / 100
            return f"Frame {rng.randrange(1, 129)} sampled at {t:.2f} seconds: {noun_phrase()} {pick(_VERBS)}."
        if kind == 3:
            return f"This is a video:\nThe {pick(_SHAPES)} {pick(_VERBS)} from {pick(_ADJ)} to {pick(_ADJ)}."
        if kind == 4:
            args = {pick(["city", "shape", "colour", "unit", "query"]): pick(_COLOURS + _NOUNS),
                    "count": n, "ok": rng.random() < 0.5}
            return json.dumps([{"name": pick(_TOOLS), "arguments": args}])
        if kind == 5:
            return json.dumps({pick(_NOUNS): pick(_COLOURS), pick(_NOUNS): n, "items": [pick(_SHAPES), None]})
        if kind == 6:
            return f"{pick(_VERBS).capitalize()} {noun_phrase()} in the {pick(_NOUNS)}, please."
        if kind == 7:
            words = [pick(_FUNCTION_WORDS + _NOUNS + _VERBS + _ADJ + _NUMBER_WORDS) + pick(_SUFFIXES)
                     for _ in range(rng.randrange(4, 14))]
            return " ".join(words).capitalize() + pick([".", "!", "?", ";", ":", ","])
        if kind == 8:
            return (f"The {pick(_NOUNS)} {pick(_VERBS)} {pick(_NUMBER_WORDS)} {pick(_COLOURS)} {pick(_SHAPES)}s "
                    f"({n}%), {rng.randrange(10)} - {rng.randrange(10)} = {rng.randrange(-9, 10)}; ok!")
        return f"Answer: {pick(_COLOURS).capitalize()} {pick(_SHAPES)} at ({n}, {rng.randrange(100)}) '{pick(_ADJ)}'."

    return [sentence() for _ in range(n_sentences)]


def _added_tokens_decoder(tok: Tokenizer) -> dict[str, dict[str, Any]]:
    return {str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                     "single_word": t.single_word, "special": t.special}
            for i, t in sorted(tok.get_added_tokens_decoder().items())}


def train_tiny_tokenizer(seed: int, model_max_length: int | None = None, vocab_size: int = TINY_BPE_VOCAB,
                         chat_template: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train the tiny byte-level BPE deterministically for `seed`.

    Returns (tokenizer.json dict, tokenizer_config.json dict). Ids: control slots 0…NUM_CONTROL_SLOTS-1,
    then the BPE vocabulary (`vocab_size` includes the control slots), then VL_TOKENS in order.
    `model_max_length` defaults to the tiny preset's max_sequence_length.
    """
    if model_max_length is None:
        from nemovl_trt.checkpoint.presets import preset_config

        model_max_length = int(preset_config("tiny")["max_sequence_length"])
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, show_progress=False,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in control_tokens()],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in VL_TOKENS])
    tok_json = json.loads(tok.to_str())
    tok_config = {
        "add_bos_token": False,
        "add_eos_token": False,
        "added_tokens_decoder": _added_tokens_decoder(tok),
        "bos_token": BOS,
        "chat_template": chat_template if chat_template is not None else default_chat_template(),
        "clean_up_tokenization_spaces": False,
        "eos_token": TURN_END,
        "extra_special_tokens": {},
        "legacy": False,
        "model_max_length": model_max_length,
        "pad_token": UNK,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": UNK,
    }
    return tok_json, tok_config


def special_tokens_map(tok_config: dict[str, Any]) -> dict[str, Any]:
    """special_tokens_map.json as HF writes it, from a tokenizer_config.json dict."""
    out: dict[str, Any] = {}
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        if isinstance(tok_config.get(key), str):
            out[key] = {"content": tok_config[key], "lstrip": False, "normalized": False, "rstrip": False,
                        "single_word": False}
    out["additional_special_tokens"] = list(VL_TOKENS)
    return out


def write_tokenizer_files(out_dir: Path, tok_json: dict[str, Any], tok_config: dict[str, Any]) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into `out_dir`."""
    (out_dir / TOKENIZER_FILE).write_text(json.dumps(tok_json, ensure_ascii=False, indent=2) + "\n",
                                          encoding="utf-8")
    (out_dir / TOKENIZER_CONFIG_FILE).write_text(json.dumps(tok_config, ensure_ascii=False, indent=2) + "\n",
                                                 encoding="utf-8")
    (out_dir / SPECIAL_TOKENS_MAP_FILE).write_text(
        json.dumps(special_tokens_map(tok_config), ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
