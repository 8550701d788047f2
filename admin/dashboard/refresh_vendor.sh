#!/bin/sh
# Re-download the dashboard's vendored front-end libraries at their pinned versions, from the npm registry,
# as their published (already minified) files. No build step: the files are copied as they are published.
# Run from anywhere; needs `npm` and network access to the npm registry. Review `git diff` afterwards.
set -eu

HTM_VERSION=3.1.1      # ships preact/standalone.module.js: Preact 10 + htm + hooks in one ES module
UPLOT_VERSION=1.6.32   # uPlot.iife.min.js + uPlot.min.css
PREACT_VERSION=10.5.15 # only for Preact's LICENSE: its code is the copy bundled inside htm's standalone build

here=$(cd "$(dirname "$0")" && pwd)
vendor="$here/vendor"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

cd "$work"
for spec in "htm@$HTM_VERSION" "uplot@$UPLOT_VERSION" "preact@$PREACT_VERSION"; do
  name=${spec%@*}
  mkdir "$name"
  tarball=$(npm pack --silent "$spec")
  tar -xzf "$tarball" -C "$name"
done

mkdir -p "$vendor"
cp htm/package/preact/standalone.module.js "$vendor/preact-htm.standalone.module.js"
cp htm/package/LICENSE "$vendor/LICENSE.htm"
cp preact/package/LICENSE "$vendor/LICENSE.preact"
cp uplot/package/dist/uPlot.iife.min.js "$vendor/uPlot.iife.min.js"
cp uplot/package/dist/uPlot.min.css "$vendor/uPlot.min.css"
cp uplot/package/LICENSE "$vendor/LICENSE.uplot"

cat > "$vendor/VERSIONS" <<VERSIONS
Vendored by refresh_vendor.sh from the npm registry (npm pack), published files copied unchanged.

htm $HTM_VERSION (Apache-2.0, LICENSE.htm)
  preact-htm.standalone.module.js  <- htm/preact/standalone.module.js
  (bundles Preact 10 and its hooks, MIT, LICENSE.preact taken from preact@$PREACT_VERSION)
uplot $UPLOT_VERSION (MIT, LICENSE.uplot)
  uPlot.iife.min.js                <- uplot/dist/uPlot.iife.min.js
  uPlot.min.css                    <- uplot/dist/uPlot.min.css

sha256:
$(cd "$vendor" && sha256sum preact-htm.standalone.module.js uPlot.iife.min.js uPlot.min.css)
VERSIONS
echo "vendored into $vendor:"
ls -l "$vendor"
