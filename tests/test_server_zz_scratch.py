import asyncio, statistics, subprocess, sys, time, os, signal
import httpx
import tritonclient.grpc.aio as aio
from nemovl_trt.server.triton_client import TritonRequest, build_inputs
from tests.fixtures_server import free_port


def test_scratch(triton_server):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "nemovl_trt.cli_serve_scratch"], stdout=subprocess.DEVNULL) if False else \
        subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "nemovl"), "serve", "--triton", triton_server.grpc_url,
                          "--port", str(port), "--host", "127.0.0.1", "--log-level", "warning"])
    try:
        for _ in range(200):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v1/health/ready").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        msgs = [{"role": "user", "content": "Hello"}]
        n = 30

        async def direct_n(n=n):
            return await direct(n)

        def api_n(n=n):
            return api(n)

        async def direct(n=n):
            client = aio.InferenceServerClient(triton_server.grpc_url)
            out = []
            for _ in range(n):
                t0 = time.perf_counter()
                inputs = build_inputs(TritonRequest(messages=msgs, params={"max_tokens": 1, "seed": 0}))
                async def reqs(inputs=inputs):
                    yield {"model_name": "nemovl", "inputs": inputs}
                async for result, error in client.stream_infer(reqs()):
                    if result.as_numpy("finish_reason").reshape(-1)[0]:
                        break
                out.append(time.perf_counter() - t0)
            await client.close()
            return out

        def api(n=n):
            out = []
            with httpx.Client(timeout=60) as c:
                for _ in range(n):
                    t0 = time.perf_counter()
                    r = c.post(f"http://127.0.0.1:{port}/v1/chat/completions",
                               json={"model": "nvidia/nemotron-nano-12b-v2-vl", "messages": msgs, "max_tokens": 1, "seed": 0})
                    assert r.status_code == 200
                    out.append(time.perf_counter() - t0)
            return out
        asyncio.run(direct()); api()
        diffs, ds, as_ = [], [], []
        for _ in range(40):
            d = statistics.median(asyncio.run(direct_n(3))); a = statistics.median(api_n(3))
            diffs.append(a - d); ds.append(d); as_.append(a)
        print(f"\nSCRATCH interleaved: direct p50 {statistics.median(ds)*1e3:.1f} ms api p50 {statistics.median(as_)*1e3:.1f} ms "
              f"paired overhead p50 {statistics.median(diffs)*1e3:.1f} ms")
    finally:
        proc.send_signal(signal.SIGINT); proc.wait(10)
