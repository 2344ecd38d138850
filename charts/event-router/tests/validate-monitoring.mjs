// Validates Prometheus Operator objects (ServiceMonitor, PodMonitor, PrometheusRule) against the
// JSON schemas of their CRDs, as packaged by @kubernetes-models/prometheus-operator.
//
// Input: a JSON array of Kubernetes objects on stdin. Objects of other API groups are ignored.
// The package is found under $EVENTROUTER_CHART_NODE_MODULES (install-tools.sh installs it).
// Exit status 1 when any object is invalid, 2 when the package is missing.
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const modules = process.env.EVENTROUTER_CHART_NODE_MODULES;
if (!modules) {
  console.error("EVENTROUTER_CHART_NODE_MODULES is not set (run charts/event-router/tests/install-tools.sh)");
  process.exit(2);
}
let v1;
try {
  v1 = await import(
    pathToFileURL(join(modules, "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/index.js")).href
  );
} catch (e) {
  console.error(`@kubernetes-models/prometheus-operator is missing under ${modules}: ${e.message}`);
  process.exit(2);
}

const objects = JSON.parse(readFileSync(0, "utf8"));
let failed = 0;
let checked = 0;
for (const obj of objects) {
  if (obj.apiVersion !== "monitoring.coreos.com/v1") continue;
  const Model = v1[obj.kind];
  const name = `${obj.kind}/${obj.metadata?.name}`;
  if (!Model) {
    console.log(`${name}: no schema for this kind`);
    failed++;
    continue;
  }
  try {
    new Model(obj).validate();
    checked++;
    console.log(`${name}: valid`);
  } catch (e) {
    failed++;
    console.log(`${name}: INVALID: ${e.message}`);
  }
}
console.log(`${checked} valid, ${failed} invalid`);
process.exit(failed ? 1 : 0);
