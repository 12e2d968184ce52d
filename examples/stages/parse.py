"""Stage 1 of `scores` (untrusted): turns an invocation payload into a checked record.

Input (stdin): a JSON object {"user": NAME, "score": N}. Output (stdout), for the next stage:
the user name on one line, then the record as compact JSON on one line. Anything else in the
payload is an error (exit 2, the reason on stderr), so the next stage never runs on it.
"""

import json
import re
import sys

PAYLOAD_BYTES_MAX = 64 * 1024
USER = re.compile(r"[a-z0-9_-]{1,32}")


def fail(reason):
    print(reason, file=sys.stderr)
    sys.exit(2)


def main():
    raw = sys.stdin.buffer.read(PAYLOAD_BYTES_MAX + 1)
    if len(raw) > PAYLOAD_BYTES_MAX:
        fail(f"the payload is over {PAYLOAD_BYTES_MAX} bytes")
    try:
        doc = json.loads(raw)
    except ValueError as e:
        fail(f"the payload is not JSON: {e}")
    if not isinstance(doc, dict) or set(doc) != {"user", "score"}:
        fail('the payload must be an object with exactly "user" and "score"')
    user, score = doc["user"], doc["score"]
    if not isinstance(user, str) or not USER.fullmatch(user):
        fail("user must be 1-32 characters of a-z 0-9 _ -")
    # bool is an int in Python; a score of true is not a score.
    if isinstance(score, bool) or not isinstance(score, int) or not 0 <= score <= 1_000_000:
        fail("score must be an integer from 0 to 1000000")
    print(user)
    print(json.dumps({"user": user, "score": score}, separators=(",", ":")))


main()
