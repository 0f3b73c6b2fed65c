"""The model repository on a real tritonserver (gRPC streaming): text, images, video ± EVS, bad input, and
token ids equal to the PyTorch reference engine called directly on the same preprocessed inputs."""

from __future__ import annotations

import pytest

from tests.fixtures_triton import mp4_bytes, png_bytes, stream_nemovl

pytestmark = pytest.mark.integration

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}


def _check_stream(res, expect_prompt_tokens: int) -> None:
    assert res.error is None, res.error
    assert res.finish_reason in ("stop", "length")
    assert [r["finish_reason"] for r in res.responses[:-1]] == [""] * (len(res.responses) - 1)
    assert res.prompt_tokens == expect_prompt_tokens
    assert res.completion_tokens == len(res.token_ids)
    assert [r["completion_tokens"] for r in res.responses] == sorted(r["completion_tokens"] for r in res.responses)
    assert all(r["info"] == "" for r in res.responses[1:])


def test_text_only_matches_reference(triton_server, triton_reference) -> None:
    messages = [SYSTEM, {"role": "user", "content": "Summarize the invoice in one sentence."}]
    params = {"max_tokens": 24, "temperature": 0.0, "seed": 3}
    res = stream_nemovl(triton_server.grpc_url, messages, params)
    ids, mm, _ = triton_reference.inputs(messages, params)
    _check_stream(res, len(ids))
    assert mm is None
    assert res.token_ids == triton_reference.generate(messages, params)
    tok = triton_reference.ctx.tokenizer
    text_ids = [t for t in res.token_ids if t not in triton_reference.eos_ids]
    assert res.text == tok.decode(text_ids)
    assert res.info["images"] == 0 and res.info["frames"] == 0


def test_sampling_with_seed_matches_reference(triton_server, triton_reference) -> None:
    messages = [{"role": "user", "content": "Write a short note about receipts."}]
    params = {"max_tokens": 16, "temperature": 0.9, "top_p": 0.9, "top_k": 50, "seed": 11}
    res = stream_nemovl(triton_server.grpc_url, messages, params)
    assert res.error is None
    assert res.token_ids == triton_reference.generate(messages, params)


def test_one_image(triton_server, triton_reference) -> None:
    img = png_bytes(512, 256, seed=1)  # 2:1 → a 2×1 grid + thumbnail = 3 tiles (max 12)
    messages = [{"role": "user", "content": [{"type": "image", "index": 0}, {"type": "text", "text": "What is this?"}]}]
    params = {"max_tokens": 12, "seed": 1}
    res = stream_nemovl(triton_server.grpc_url, messages, params, images=[img])
    ids, mm, _ = triton_reference.inputs(messages, params, images=[img])
    _check_stream(res, len(ids))
    tiles = res.info["tiles"]
    assert tiles == [3]
    assert mm.shape[0] == 3 * triton_reference.ctx.cfg.tokens_per_tile
    assert ids.count(triton_reference.ctx.cfg.img_context_token_id) == mm.shape[0]
    assert res.token_ids == triton_reference.generate(messages, params, images=[img])


def test_several_images_and_max_num_tiles(triton_server, triton_reference) -> None:
    imgs = [png_bytes(300, 300, seed=2), png_bytes(600, 300, seed=3)]  # alone: 1 and 2×1+1 = 3 tiles
    messages = [{"role": "user", "content": [{"type": "image", "index": 0}, {"type": "image", "index": 1},
                                             {"type": "text", "text": "Compare them."}]}]
    params = {"max_tokens": 8, "seed": 2, "max_num_tiles": 1}
    res = stream_nemovl(triton_server.grpc_url, messages, params, images=imgs)
    ids, _, _ = triton_reference.inputs(messages, params, images=imgs)
    _check_stream(res, len(ids))
    assert res.info["images"] == 2
    assert res.info["tiles"] == [1, 1]  # max_num_tiles 1: one tile each, no thumbnail
    assert res.token_ids == triton_reference.generate(messages, params, images=imgs)


def test_video_with_and_without_evs(triton_server, triton_reference) -> None:
    video = mp4_bytes(frames=24, fps=8)  # 3 s → 8 frames (minimum) at the default 2 fps
    messages = [{"role": "user", "content": [{"type": "video", "index": 0}, {"type": "text", "text": "Describe."}]}]
    p = triton_reference.ctx.cfg.tokens_per_tile
    off = stream_nemovl(triton_server.grpc_url, messages, {"max_tokens": 6, "seed": 4, "video_pruning_rate": 0.0},
                        video=video)
    on = stream_nemovl(triton_server.grpc_url, messages, {"max_tokens": 6, "seed": 4, "video_pruning_rate": 0.75},
                       video=video)
    assert off.error is None and on.error is None, (off.error, on.error)
    frames = off.info["frames"]
    assert frames == 8 and on.info["frames"] == 8
    retained = max(p, int(frames * p * 0.25))
    assert off.prompt_tokens - on.prompt_tokens == frames * p - retained
    assert on.info["evs_pruned_tokens"] == frames * p - retained and off.info["evs_pruned_tokens"] == 0
    _check_stream(off, off.prompt_tokens)
    params = {"max_tokens": 6, "seed": 4, "video_pruning_rate": 0.75}
    ids, mm, _ = triton_reference.inputs(messages, params, video=video)
    _check_stream(on, len(ids))
    assert mm.shape[0] == retained
    assert on.token_ids == triton_reference.generate(messages, params, video=video)


@pytest.mark.parametrize("kwargs, code", [
    ({"images": [b"\x89PNG\r\n\x1a\n garbage bytes"]}, "invalid_image"),
    ({"images": [png_bytes(16, 16, seed=5)]}, "image_too_small"),
    ({"video": b"not a video at all"}, "invalid_video"),
    ({"params": {"fps": 30.0}, "video": "VIDEO"}, "invalid_video_sampling"),  # fps above the source's 8
    ({"params": {"max_num_tiles": 13}}, "invalid_parameter"),
    ({"params": {"max_tokens": 10**6}}, "context_length_exceeded"),
])
def test_bad_input_is_invalid_arg_and_server_keeps_serving(triton_server, kwargs, code) -> None:
    kwargs = dict(kwargs)
    media = "video" if "video" in kwargs else "image"
    if kwargs.get("video") == "VIDEO":
        kwargs["video"] = mp4_bytes(frames=24, fps=8)
    params = kwargs.pop("params", {"max_tokens": 4})
    content = [{"type": media, "index": 0}, {"type": "text", "text": "hi"}] if (
        "images" in kwargs or "video" in kwargs) else "hi"
    res = stream_nemovl(triton_server.grpc_url, [{"role": "user", "content": content}], params, **kwargs)
    assert res.error is not None and res.error.startswith(f"[{code}] "), res.error
    assert res.responses == []
    ok = stream_nemovl(triton_server.grpc_url, [{"role": "user", "content": "still there?"}], {"max_tokens": 3})
    assert ok.error is None and ok.finish_reason in ("stop", "length")


def test_stop_string_is_not_returned(triton_server, triton_reference) -> None:
    messages = [{"role": "user", "content": "Tell me about invoices."}]
    base = stream_nemovl(triton_server.grpc_url, messages, {"max_tokens": 20, "seed": 5, "ignore_eos": True})
    assert base.error is None and len(base.text) > 4
    stop = base.text[len(base.text) // 2: len(base.text) // 2 + 2]
    cut = base.text.index(stop)
    res = stream_nemovl(triton_server.grpc_url, messages, {"max_tokens": 20, "seed": 5, "ignore_eos": True,
                                                           "stop": [stop]})
    assert res.error is None
    assert res.finish_reason == "stop"
    assert res.text == base.text[:cut]
    assert res.token_ids == base.token_ids[:len(res.token_ids)]


def test_readme_example_runs(triton_server, tmp_path, capsys) -> None:
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "docs" / "triton.md").read_text()
    code = re.search(r"## Send one request.*?```python\n(.*?)```", readme, re.S).group(1)
    photo = tmp_path / "photo.png"
    photo.write_bytes(png_bytes(256, 256, seed=9))
    code = code.replace("127.0.0.1:8001", triton_server.grpc_url).replace('"photo.jpg"', repr(str(photo)))
    exec(compile(code, "README example", "exec"), {})
    words = capsys.readouterr().out.split()
    # ... print(text, finish, prompt_tokens, completion_tokens)
    assert words[-3] in ("stop", "length") and 1 <= int(words[-1]) <= 64 and int(words[-2]) > 256
