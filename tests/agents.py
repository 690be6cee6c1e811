"""Agents the end-to-end tests run (agent.cls "tests.agents:...": the Ray workers import it from the repository
root, their working directory). Each is real user code on the real `openai` client, not a stand-in for anything of
ours."""
import asyncio
import threading
import zlib

import httpx
import openai

from rlhf_ray.tiny_world.tool_task import calculator_agent, openai_client


async def faulty(base_url: str, api_key: str, row: dict):
    """The calculator agent, misbehaving as the row's `mode` says: "ok"; "raise" (before any call); "hang" (after
    its first call, past agent.timeout_s); "malformed" (a call with no messages first, then as "ok"); "late" (as
    "ok", then one more call a second after its episode has ended, from a thread of its own)."""
    mode = row.get("mode", "ok")
    if mode == "raise":
        raise RuntimeError("the agent crashed")
    if mode == "malformed":
        async with openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0) as client:
            try:
                await client.chat.completions.create(model="policy", messages=[])
            except openai.BadRequestError:
                pass
    if mode == "hang":
        async with openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0) as client:
            await client.chat.completions.create(model="policy", max_tokens=4,
                                                 messages=[{"role": "user", "content": row["prompt"]}])
        await asyncio.sleep(3600)
    reward = await calculator_agent(base_url, api_key, row)
    if mode == "late":
        def call_again():
            httpx.post(f"{base_url}/chat/completions", headers={"Authorization": f"Bearer {api_key}"},
                       json={"model": "policy", "messages": [{"role": "user", "content": row["prompt"]}]})
        threading.Timer(1.0, call_again).start()
    return reward


async def tagged(base_url: str, api_key: str, row: dict):
    """Three calls, each adding a user turn with the row's tag; returns a checksum of the three replies' texts (so
    a reply that reached the wrong session shows)."""
    tag = row["tag"]
    messages = [{"role": "user", "content": f"Question: {tag}\nAnswer:"}]
    seen, client = [], openai_client(base_url, api_key)
    for turn in range(3):
        reply = (await client.chat.completions.create(model="policy", messages=messages, max_tokens=4)).choices[0].message
        seen.append(reply.content or "")
        messages += [reply.model_dump(exclude_none=True), {"role": "user", "content": f" {tag} again:"}]
    return float(zlib.crc32("|".join(seen).encode()) % 100_000)
