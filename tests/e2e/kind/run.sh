#!/usr/bin/env bash
# End-to-end check of the LLMPool operator on a kind cluster (see README.md next to this file).
#
#   create cluster -> Gateway API + GIE CRDs -> build/load images -> operator (Helm chart, CRDs included)
#   -> manifests/samples/llmpool-cpu.yaml -> kgateway -> Gateway + HTTPRoute -> curl -> clean up
#
# Needs docker, kind, kubectl, helm and curl. Upstream locations are variables YOU set
# (nothing is fetched from a hard-coded host); README.md lists the values we tested against.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)"

CLUSTER="${CLUSTER:-llmpool-e2e}"
OPERATOR_IMAGE="${OPERATOR_IMAGE:-llmpool/llmpool-operator:e2e}"
PICKER_IMAGE="${PICKER_IMAGE:-llmpool/llmpool-picker:e2e}"
POOL_NS="${POOL_NS:-llm}"
POOL_NAME="${POOL_NAME:-tiny-cpu}"
MODEL="${MODEL:-qwen2.5-0.5b}"
KEEP="${KEEP:-0}"                       # KEEP=1: leave the cluster running at the end
TIMEOUT="${TIMEOUT:-900s}"              # CPU vLLM downloads and loads the model: be patient

: "${GATEWAY_API_CRDS_URL:?set GATEWAY_API_CRDS_URL to the Gateway API standard-install.yaml of a release (README.md)}"
: "${GIE_CRDS_URL:?set GIE_CRDS_URL to the Inference Extension manifests.yaml of a release (README.md)}"
: "${KGATEWAY_CRDS_CHART:?set KGATEWAY_CRDS_CHART to the kgateway CRDs Helm chart reference (README.md)}"
: "${KGATEWAY_CHART:?set KGATEWAY_CHART to the kgateway Helm chart reference (README.md)}"
KGATEWAY_VERSION="${KGATEWAY_VERSION:?set KGATEWAY_VERSION (README.md)}"
GATEWAY_CLASS="${GATEWAY_CLASS:-kgateway}"

log() { printf '\n== %s\n' "$*" >&2; }

cleanup() {
  local rc=$?
  if [[ "$KEEP" == "1" ]]; then
    log "KEEP=1: cluster ${CLUSTER} left running (kind delete cluster --name ${CLUSTER})"
  else
    log "deleting cluster ${CLUSTER}"
    kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true
  fi
  [[ -n "${PF_PID:-}" ]] && kill "$PF_PID" 2>/dev/null || true
  [[ -n "${BUILD_DIR:-}" ]] && rm -rf "$BUILD_DIR"
  exit "$rc"
}
trap cleanup EXIT

for tool in docker kind kubectl helm curl; do
  command -v "$tool" >/dev/null || { echo "missing tool: $tool" >&2; exit 2; }
done

log "1. kind cluster ${CLUSTER}"
kind create cluster --name "$CLUSTER" --wait 120s
kubectl config use-context "kind-${CLUSTER}"

log "2. Gateway API and Inference Extension CRDs"
kubectl apply --server-side -f "$GATEWAY_API_CRDS_URL"
kubectl apply --server-side -f "$GIE_CRDS_URL"
kubectl wait --for condition=Established --timeout=60s crd/inferencepools.inference.networking.k8s.io

log "3. build and load the operator and picker images (operator/Dockerfile, extender/Dockerfile)"
docker build -t "$OPERATOR_IMAGE" -f "$REPO_ROOT/operator/Dockerfile" "$REPO_ROOT"
docker build -t "$PICKER_IMAGE" -f "$REPO_ROOT/extender/Dockerfile" "$REPO_ROOT"
kind load docker-image "$OPERATOR_IMAGE" "$PICKER_IMAGE" --name "$CLUSTER"

log "4. the operator from the Helm chart (our CRDs come with it; GIE's InferencePool CRD above is kept)"
helm upgrade -i llmpool "$REPO_ROOT/charts/llmpool" -n llmpool-system --create-namespace \
  --set image.repository="${OPERATOR_IMAGE%:*}" --set image.tag="${OPERATOR_IMAGE##*:}" \
  --set picker.image.repository="${PICKER_IMAGE%:*}" --set picker.image.tag="${PICKER_IMAGE##*:}" \
  --set image.pullPolicy=IfNotPresent --set webhook.enabled=true --wait
kubectl wait --for condition=Established --timeout=60s crd/llmpools.llmpool.io

log "5. operator rollout"
kubectl -n llmpool-system rollout status deploy/llmpool-operator --timeout=180s

log "6. the example pool ${POOL_NS}/${POOL_NAME}"
kubectl create namespace "$POOL_NS" --dry-run=client -o yaml | kubectl apply -f -
# the admission webhook refuses what only the operator can check (an unknown policy parameter)
bad_out="$(kubectl apply -f - 2>&1 <<YAML || true
apiVersion: llmpool.io/v1alpha1
kind: LLMPool
metadata:
  name: bad-params
  namespace: ${POOL_NS}
spec:
  model:
    name: m
    source:
      huggingFace: org/m
  routing:
    policy:
      name: impact
      params:
        impactWeight: 1
YAML
)"
echo "$bad_out"
grep -q "denied the request: spec.routing.policy" <<<"$bad_out" || { echo "the webhook did not refuse a bad spec" >&2; exit 1; }
kubectl apply -f "$REPO_ROOT/manifests/samples/llmpool-cpu.yaml"
for child in "deploy/${POOL_NAME}-picker" "deploy/${POOL_NAME}-engine" "svc/${POOL_NAME}-picker" \
    "configmap/${POOL_NAME}-picker" "inferencepool/${POOL_NAME}"; do
  until kubectl -n "$POOL_NS" get "$child" >/dev/null 2>&1; do sleep 2; done
  echo "created: $child"
done
kubectl -n "$POOL_NS" wait --for=jsonpath='{.status.phase}'=Ready "llmpool/${POOL_NAME}" --timeout="$TIMEOUT"
kubectl -n "$POOL_NS" get llmpool "$POOL_NAME" -o yaml

log "7. kgateway ${KGATEWAY_VERSION} with the Inference Extension enabled"
helm upgrade -i kgateway-crds "$KGATEWAY_CRDS_CHART" --version "$KGATEWAY_VERSION" \
  --namespace kgateway-system --create-namespace --wait
helm upgrade -i kgateway "$KGATEWAY_CHART" --version "$KGATEWAY_VERSION" \
  --namespace kgateway-system --set inferenceExtension.enabled=true --wait
kubectl apply -f - <<YAML
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: inference-gateway
  namespace: ${POOL_NS}
spec:
  gatewayClassName: ${GATEWAY_CLASS}
  listeners:
    - name: http
      protocol: HTTP
      port: 80
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: ${POOL_NAME}
  namespace: ${POOL_NS}
spec:
  parentRefs:
    - name: inference-gateway
  rules:
    - matches:
        - path:
            type: PathPrefix
            value: /
      backendRefs:
        - group: inference.networking.k8s.io
          kind: InferencePool
          name: ${POOL_NAME}
      timeouts:
        request: 300s
YAML
kubectl -n "$POOL_NS" wait --for=condition=Programmed gateway/inference-gateway --timeout=180s

log "8. requests through the gateway"
GW_SVC="$(kubectl -n "$POOL_NS" get svc -l gateway.networking.k8s.io/gateway-name=inference-gateway \
  -o jsonpath='{.items[0].metadata.name}')"
kubectl -n "$POOL_NS" port-forward "svc/${GW_SVC}" 18080:80 >/dev/null 2>&1 &
PF_PID=$!
for _ in $(seq 1 30); do curl -s -o /dev/null http://127.0.0.1:18080/ && break; sleep 1; done
ok=0
for i in 1 2 3 4 5; do
  body="{\"model\":\"${MODEL}\",\"prompt\":\"Say hello ${i}\",\"max_tokens\":8}"
  if curl -sf -H 'content-type: application/json' -d "$body" http://127.0.0.1:18080/v1/completions; then
    ok=$((ok + 1)); echo
  fi
done
echo "completions: ${ok}/5"
[[ "$ok" -ge 4 ]] || { echo "too many failed requests" >&2; exit 1; }

log "9. garbage collection: deleting the LLMPool removes its children"
kubectl -n "$POOL_NS" delete llmpool "$POOL_NAME" --wait=true
kubectl -n "$POOL_NS" wait --for=delete "deploy/${POOL_NAME}-engine" "inferencepool/${POOL_NAME}" --timeout=120s

log "PASS"
