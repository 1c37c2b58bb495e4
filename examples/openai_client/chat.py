"""A chat loop in the terminal over `/v1/chat/completions`, streamed token by token.

    butterfly cluster up --nodes 2 --model /path/to/an-instruct-checkpoint
    python examples/openai_client/chat.py [--url http://127.0.0.1:8080/v1] [--system "..."]

The conversation is kept here and sent whole each turn, as with any OpenAI-compatible
server; the checkpoint's own chat template (tokenizer_config.json) turns it into the
prompt. A checkpoint without a template gets a 400 saying so. Ctrl-D or an empty line
ends the loop. (The demo model's weights are random: it answers in noise.)
"""

from __future__ import annotations

import argparse

from openai import OpenAI


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default="http://127.0.0.1:8080/v1")
    parser.add_argument("--api-key", default="none")
    parser.add_argument("--system", default="You are a helpful assistant.")
    parser.add_argument("--max-tokens", type=int, default=256)
    args = parser.parse_args()
    client = OpenAI(base_url=args.url, api_key=args.api_key)
    model = client.models.list().data[0].id
    messages = [{"role": "system", "content": args.system}]
    print(f"chatting with {model}; an empty line ends")
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if not line:
            break
        messages.append({"role": "user", "content": line})
        print("bot> ", end="", flush=True)
        reply = []
        stream = client.chat.completions.create(
            model=model,
            messages=messages,  # type: ignore[arg-type]
            max_tokens=args.max_tokens,
            stream=True,
        )
        for chunk in stream:
            for choice in chunk.choices:
                piece = choice.delta.content or ""
                reply.append(piece)
                print(piece, end="", flush=True)
        print()
        messages.append({"role": "assistant", "content": "".join(reply)})


if __name__ == "__main__":
    main()
