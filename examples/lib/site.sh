# Sourced by every example script and sbatch template: a site's settings, written once.
#
# A cluster sets its paths in one env file (shell `NAME=value` lines; examples/site.env.example shows them):
#   BLTOOL_HOME        where bltool keeps converted models and teachers.toml (aliases)
#   BLTOOL_TEACHER     the teacher alias or path the examples use
#   BLTOOL_CORPUS      the corpus prepare-data reads
#   BLTOOL_DATA_ROOT   where prepared data goes
#   BLTOOL_RUNS_ROOT   where runs go
# The file is $BLTOOL_ENV, else ${XDG_CONFIG_HOME:-$HOME/.config}/bltool/site.env, read when it exists.
# Values are taken literally (no quotes, no $expansion). A variable already set in the environment wins
# over the file. Nothing here assumes the repository is the
# working directory.
bltool_site_env=${BLTOOL_ENV:-${XDG_CONFIG_HOME:-$HOME/.config}/bltool/site.env}
if [ -n "${BLTOOL_ENV:-}" ] && [ ! -f "$BLTOOL_ENV" ]; then
  echo "error: BLTOOL_ENV=$BLTOOL_ENV is not a file" >&2
  exit 2
fi
if [ -f "$bltool_site_env" ]; then
  while IFS= read -r bltool_line || [ -n "$bltool_line" ]; do
    case "$bltool_line" in ''|'#'*) continue ;; esac
    bltool_name=${bltool_line%%=*}
    case "$bltool_name" in
      BLTOOL_HOME|BLTOOL_TEACHER|BLTOOL_CORPUS|BLTOOL_DATA_ROOT|BLTOOL_RUNS_ROOT) ;;
      *) echo "error: $bltool_site_env: unknown setting $bltool_name (expected BLTOOL_HOME, BLTOOL_TEACHER, BLTOOL_CORPUS, BLTOOL_DATA_ROOT or BLTOOL_RUNS_ROOT)" >&2
         exit 2 ;;
    esac
    if [ -z "${!bltool_name:-}" ]; then
      export "$bltool_name=${bltool_line#*=}"
    fi
  done < "$bltool_site_env"
fi
unset bltool_line bltool_name bltool_site_env
