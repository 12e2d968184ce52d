#!/bin/sh
# Stage 2 of `scores` (trusted): stores the record stage 1 checked under scores/USER and
# answers with where and at which version. It trusts the parser's format, not its honesty:
# the name is checked again before it becomes part of a key, and the data service refuses any
# key outside scores/ whatever this script is made to do.
IFS= read -r user || { echo "no user line from the parser" >&2; exit 2; }
IFS= read -r record || { echo "no record line from the parser" >&2; exit 2; }
case "$user" in
  "" | *[!a-z0-9_-]*) echo "bad user name from the parser" >&2; exit 2 ;;
esac
version=$(skiff-data put "scores/$user" "$record") || exit 3
printf '{"stored":"scores/%s","version":%s}\n' "$user" "$version"
