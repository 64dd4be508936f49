# Sourced by the sittings' device scripts: `run NAME VAR=VALUE...` times the compiled `xl`
# decode step (`engine_check.sh engine`) under those environment assignments into
# $OUT/NAME, printing its table rows, and keeps only the run's .json and .md (a device call
# returns few files).
run() {
  local name=$1; shift
  echo "== $name $*"
  env "$@" ENGINE_MODES=compiled OUT=$OUT/$name bash benchmarks/engine_check.sh engine 2>&1 \
    | grep -aE "^\| (gqa|gta|gla|mla)|^Copy|decode .* step" | head -30
  rm -f "$OUT/$name"/*.png "$OUT/$name/log"
}
