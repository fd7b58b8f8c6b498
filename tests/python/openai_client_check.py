"""Drives the gateway's OpenAI-compatible API with the unmodified official `openai` client.

Usage: openai_client_check.py BASE_URL API_KEY IMAGE_PATH MAX_TOKENS EOS_ID FORCED_ID
Prints one JSON object with what the client saw; the Rust test (tests/e2e/openai_client.rs)
checks it against the golden ids. Exits non-zero on any client-side failure.
"""
import base64
import json
import sys

import openai

base_url, api_key, image_path, max_tokens = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
eos_id, forced_id = int(sys.argv[5]), int(sys.argv[6])
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

# Sampling and output parameters: OpenAI's as keyword arguments, vLLM's through extra_body.
model = out["models"][0]
text = [{"role": "user", "content": "Tell me about rockets."}]
ids = lambda r: r.model_extra["dsvl"]["token_ids"]
s = {}
s["greedy"] = ids(client.chat.completions.create(model=model, messages=text, temperature=0, max_tokens=16))
r = client.chat.completions.create(model=model, messages=text, temperature=1, seed=11, n=2, max_tokens=6,
                                   logprobs=True, top_logprobs=3)
s["n"] = [{"index": c.index, "finish_reason": c.finish_reason, "content": c.message.content,
           "tokens": [t.token for t in c.logprobs.content],
           "logprobs": [t.logprob for t in c.logprobs.content],
           "top": [[a.logprob for a in t.top_logprobs] for t in c.logprobs.content]} for c in r.choices]
s["n_ids"] = r.model_extra["dsvl"]["choices_token_ids"]
s["n_usage"] = r.usage.model_dump()
s["seed_11"] = ids(client.chat.completions.create(model=model, messages=text, temperature=1, seed=11, max_tokens=6))
s["seed_12"] = ids(client.chat.completions.create(model=model, messages=text, temperature=1, seed=12, max_tokens=6))
stream = client.chat.completions.create(model=model, messages=text, temperature=1, seed=11, n=2, max_tokens=6,
                                        logprobs=True, top_logprobs=3, stream=True)
streamed = {}
for chunk in stream:
    for c in chunk.choices:
        e = streamed.setdefault(str(c.index), {"content": "", "logprobs": [], "finish_reason": None})
        e["content"] += c.delta.content or ""
        if c.logprobs is not None:
            e["logprobs"] += [t.logprob for t in c.logprobs.content]
        if c.finish_reason is not None:
            e["finish_reason"] = c.finish_reason
s["stream_n"] = streamed
s["penalised"] = ids(client.chat.completions.create(model=model, messages=text, temperature=0, max_tokens=16,
                                                    presence_penalty=-2, frequency_penalty=-1.5))
s["forced"] = ids(client.chat.completions.create(model=model, messages=text, temperature=0, max_tokens=4,
                                                 logit_bias={str(forced_id): 100}))
s["min_p"] = ids(client.chat.completions.create(model=model, messages=text, temperature=1, seed=7, max_tokens=16,
                                                extra_body={"min_p": 1.0}))
r = client.chat.completions.create(model=model, messages=text, temperature=0, max_tokens=16,
                                   extra_body={"stop_token_ids": [s["greedy"][3]]})
s["stopped"] = [ids(r), r.choices[0].finish_reason, (r.choices[0].model_extra or {}).get("stop_reason")]
r = client.chat.completions.create(model=model, messages=text, temperature=0, max_tokens=8,
                                   logit_bias={str(eos_id): 100}, extra_body={"min_tokens": 3})
s["min_tokens"] = [ids(r), r.choices[0].finish_reason]
r = client.chat.completions.create(model=model, messages=text, temperature=0, max_tokens=16,
                                   extra_body={"structured_outputs": {"choice": ["rockets fly", "rockets fall"]}})
s["choice"] = r.choices[0].message.content
r = client.chat.completions.create(model=model, messages=text, temperature=0, max_tokens=4,
                                   logit_bias={str(eos_id): 100}, extra_body={"ignore_eos": True})
s["ignore_eos"] = [ids(r), r.choices[0].finish_reason]
r = client.completions.create(model=model, prompt="Once upon a time", temperature=1, seed=3, n=2, max_tokens=5,
                              logprobs=2)
s["legacy"] = [{"index": c.index, "tokens": c.logprobs.tokens, "token_logprobs": c.logprobs.token_logprobs,
                "top": [len(t) for t in c.logprobs.top_logprobs], "offsets": c.logprobs.text_offset, "text": c.text}
               for c in r.choices]
# lm-evaluation-harness's `local-completions` loglikelihood request, as it sends it: a batch of
# token-id prompts, echoed with their log-probabilities and one new token.
r = client.completions.create(model=model, prompt=[s["greedy"][:6], s["greedy"][:9]], temperature=0,
                              max_tokens=1, logprobs=1, seed=1234, echo=True)
s["scoring"] = [{"index": c.index, "token_logprobs": c.logprobs.token_logprobs,
                 "top": [None if t is None else len(t) for t in c.logprobs.top_logprobs]}
                for c in sorted(r.choices, key=lambda c: c.index)]
try:
    client.chat.completions.create(model=model, messages=text, max_tokens=1, top_logprobs=21, logprobs=True)
    s["too_many_top"] = "accepted"
except openai.BadRequestError as e:
    s["too_many_top"] = e.status_code
out["sampling"] = s

# Tools: required (constrained: always parses), a named function streamed, the role tool in a
# later turn, and auto.
tools = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
     "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                    "required": ["city"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "get_time", "description": "Local time",
     "parameters": {"type": "object", "properties": {"zone": {"enum": ["utc", "local"]}},
                    "required": ["zone"], "additionalProperties": False}}},
]
ask = [{"role": "user", "content": "What is the weather in Paris?"}]
t = {}
r = client.chat.completions.create(model=model, messages=ask, tools=tools, tool_choice="required",
                                   temperature=1, seed=5, max_tokens=200)
msg = r.choices[0].message
t["required"] = {"finish_reason": r.choices[0].finish_reason, "content": msg.content,
                 "calls": [{"id": c.id, "type": c.type, "name": c.function.name,
                            "arguments": json.loads(c.function.arguments)} for c in (msg.tool_calls or [])]}
stream = client.chat.completions.create(model=model, messages=ask, tools=tools, max_tokens=200, temperature=1,
                                        seed=6, tool_choice={"type": "function", "function": {"name": "get_time"}},
                                        stream=True)
calls, finish, content = {}, None, ""
for chunk in stream:
    for c in chunk.choices:
        content += c.delta.content or ""
        for tc in c.delta.tool_calls or []:
            e = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
            e["id"] = tc.id or e["id"]
            e["name"] += tc.function.name or ""
            e["arguments"] += tc.function.arguments or ""
        if c.finish_reason is not None:
            finish = c.finish_reason
t["named_stream"] = {"finish_reason": finish, "content": content,
                     "calls": [{"id": c["id"], "name": c["name"], "arguments": json.loads(c["arguments"])}
                               for c in calls.values()]}
first = t["required"]["calls"][0]
follow = ask + [
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": first["id"], "type": "function",
         "function": {"name": first["name"], "arguments": json.dumps(first["arguments"])}}]},
    {"role": "tool", "tool_call_id": first["id"], "content": "Sunny, 21 C"},
]
r = client.chat.completions.create(model=model, messages=follow, tools=tools, temperature=0, max_tokens=6,
                                   extra_body={"return_prompt_token_ids": True})
t["follow_up"] = {"finish_reason": r.choices[0].finish_reason, "content": r.choices[0].message.content,
                  "prompt_ids": r.model_extra["dsvl"]["prompt_token_ids"], "call_id": first["id"]}
r = client.chat.completions.create(model=model, messages=ask, tools=tools, tool_choice="auto", temperature=0,
                                   max_tokens=6)
t["auto"] = {"finish_reason": r.choices[0].finish_reason, "content": r.choices[0].message.content,
             "tool_calls": r.choices[0].message.tool_calls}
try:
    client.chat.completions.create(model=model, messages=follow[:2] + [{"role": "tool", "tool_call_id": "call_x",
                                   "content": "?"}], max_tokens=1)
    t["unknown_call"] = "accepted"
except openai.BadRequestError as e:
    t["unknown_call"] = e.status_code
out["tools"] = t

print(json.dumps(out))
