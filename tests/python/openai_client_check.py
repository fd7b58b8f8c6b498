"""Drives the gateway's OpenAI-compatible API with the unmodified official `openai` client.

Usage: openai_client_check.py BASE_URL API_KEY IMAGE_PATH MAX_TOKENS
Prints one JSON object with what the client saw; the Rust test (tests/e2e/openai_client.rs)
checks it against the golden ids. Exits non-zero on any client-side failure.
"""
import base64
import json
import sys

import openai

base_url, api_key, image_path, max_tokens = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=120)
with open(image_path, "rb") as f:
    data_url = "data:image/jpeg;base64," + base64.b64encode(f.read()).decode()
messages = [
    {"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url}},
        {"type": "text", "text": "Describe each stage of this image."},
    ]},
]
out = {}

models = client.models.list()
out["models"] = [m.id for m in models.data]

resp = client.chat.completions.create(model=out["models"][0], messages=messages, temperature=0, max_tokens=max_tokens)
out["text"] = resp.choices[0].message.content
out["finish_reason"] = resp.choices[0].finish_reason
out["usage"] = resp.usage.model_dump()
out["token_ids"] = resp.model_extra["dsvl"]["token_ids"]

stream = client.chat.completions.create(
    model=out["models"][0], messages=messages, temperature=0, max_tokens=max_tokens,
    stream=True, stream_options={"include_usage": True},
)
pieces, stream_ids, finish, usage = [], [], None, None
for chunk in stream:
    if chunk.usage is not None:
        usage = chunk.usage.model_dump()
    for choice in chunk.choices:
        if choice.delta.content:
            pieces.append(choice.delta.content)
        if choice.finish_reason is not None:
            finish = choice.finish_reason
        elif (chunk.model_extra or {}).get("dsvl"):
            stream_ids.extend(chunk.model_extra["dsvl"]["token_ids"])
out["stream_text"] = "".join(pieces)
out["stream_finish_reason"] = finish
out["stream_usage"] = usage
out["stream_token_ids"] = stream_ids

try:
    openai.OpenAI(base_url=base_url, api_key="sk-wrong", max_retries=0).chat.completions.create(model=out["models"][0], messages=messages, max_tokens=1)
    out["bad_key"] = "accepted"
except openai.AuthenticationError as e:
    out["bad_key"] = e.status_code

try:
    client.chat.completions.create(model=out["models"][0], messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://example.com/x.png"}}]}], max_tokens=1)
    out["remote_url"] = "accepted"
except openai.BadRequestError as e:
    out["remote_url"] = e.status_code

print(json.dumps(out))
