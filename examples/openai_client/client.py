"""The official `openai` client against a Butterfly cluster: completions, chat, streaming.

Start a cluster first (it serves the demo model, or `--model DIR` for a checkpoint):

    butterfly cluster up --nodes 2 --api-port 8080

then

    python examples/openai_client/client.py [--url http://127.0.0.1:8080/v1]

The model name is the cluster's `model.served_name` (default: the model directory's
name); the script reads it from `/v1/models`, as any client can. With `api.tokens` set,
pass one as `--api-key`; otherwise any key is accepted.
"""

from __future__ import annotations

import argparse

from openai import OpenAI


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default="http://127.0.0.1:8080/v1")
    parser.add_argument("--api-key", default="none")
    args = parser.parse_args()
    client = OpenAI(base_url=args.url, api_key=args.api_key)
    model = client.models.list().data[0].id
    print(f"model: {model}")

    done = client.completions.create(
        model=model, prompt="Once upon a time", max_tokens=24, seed=1, stop=["\n\n"], logprobs=2
    )
    print("completion:", repr(done.choices[0].text), done.choices[0].finish_reason, done.usage)

    chat = client.chat.completions.create(
        model=model,
        messages=[
            {"role": "system", "content": "You answer in one sentence."},
            {"role": "user", "content": "What does a pipeline of stages do?"},
        ],
        max_tokens=48,
        temperature=0.7,
        seed=2,
    )
    print("chat:", repr(chat.choices[0].message.content), chat.choices[0].finish_reason)

    print("streamed: ", end="", flush=True)
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Count to five."}],
        max_tokens=48,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        for choice in chunk.choices:
            print(choice.delta.content or "", end="", flush=True)
        if chunk.usage is not None:
            print(f"\n[{chunk.usage.completion_tokens} tokens]")


if __name__ == "__main__":
    main()
