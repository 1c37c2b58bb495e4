#!/bin/sh
# The OpenAI-compatible routes with curl. Start a cluster first:
#     butterfly cluster up --nodes 2 --api-port 8080
# With api.tokens set, add:  -H "Authorization: Bearer $TOKEN"
set -eu
URL=${URL:-http://127.0.0.1:8080}
MODEL=$(curl -s "$URL/v1/models" | python3 -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["id"])')
echo "model: $MODEL"

# a completion, cut at a stop string, with the two likeliest tokens at each step
curl -s "$URL/v1/completions" -H 'Content-Type: application/json' -d "{
  \"model\": \"$MODEL\", \"prompt\": \"Once upon a time\", \"max_tokens\": 16,
  \"stop\": [\"\\n\\n\"], \"logprobs\": 2, \"seed\": 1
}"
echo

# a chat completion through the checkpoint's chat template
curl -s "$URL/v1/chat/completions" -H 'Content-Type: application/json' -d "{
  \"model\": \"$MODEL\", \"max_tokens\": 32, \"seed\": 2,
  \"messages\": [{\"role\": \"user\", \"content\": \"Say hello.\"}]
}"
echo

# streamed (server-sent events), with a last chunk carrying usage; -N: no buffering
curl -sN "$URL/v1/chat/completions" -H 'Content-Type: application/json' -d "{
  \"model\": \"$MODEL\", \"max_tokens\": 16, \"stream\": true,
  \"stream_options\": {\"include_usage\": true},
  \"messages\": [{\"role\": \"user\", \"content\": \"Count to three.\"}]
}"
