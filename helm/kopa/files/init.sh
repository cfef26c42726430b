# The init container's script (POSIX sh), run before OPA and kopa start. It fills OPA's bootstrap directory
# from the chart's ConfigMap and, with authz, writes the management token and completes the `system.authz`
# policy with it. Every path comes from the environment, so the chart's tests run this same script.
#   SOURCE_DIR     the bootstrap ConfigMap, mounted read-only (*.rego, and authz.rego.tmpl with authz)
#   BOOTSTRAP_DIR  OPA's bootstrap directory (an emptyDir OPA mounts read-only)
#   TOKEN_DIR      where kopa reads the token from (an in-memory emptyDir only kopa mounts)
#   AUTHZ          "true" to lock OPA's API with a token
#   TOKEN_FILE     optional: a file whose first line is the token (an existing Secret); else a random one
set -eu
umask 027

for policy in "$SOURCE_DIR"/*.rego; do
  [ -e "$policy" ] || continue
  cp "$policy" "$BOOTSTRAP_DIR/"
done

if [ "$AUTHZ" = "true" ]; then
  if [ -n "${TOKEN_FILE:-}" ]; then
    token=$(head -n 1 "$TOKEN_FILE" | tr -d '\r')
  else
    # 16 random bytes as 32 hex digits.
    token=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
  fi
  if [ -z "$token" ]; then
    echo "kopa init: the management token is empty" >&2
    exit 1
  fi
  case "$token" in
    *'`'*)
      echo "kopa init: the management token must not contain a backtick" >&2
      exit 1
      ;;
  esac
  printf '%s\n' "$token" > "$TOKEN_DIR/mgmt-token"
  # The token goes into a Rego raw string (backticks), which takes every character but the backtick.
  { cat "$SOURCE_DIR/authz.rego.tmpl"; printf 'token := `%s`\n' "$token"; } > "$BOOTSTRAP_DIR/authz.rego"
fi
echo "kopa init: bootstrap directory ready: $(ls "$BOOTSTRAP_DIR" | tr '\n' ' ')"
