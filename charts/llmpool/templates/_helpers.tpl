{{/* Base name of the operator's objects: "<release>-operator" unless overridden. */}}
{{- define "llmpool.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-operator" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "llmpool.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Selector labels (immutable on a Deployment: keep them stable). */}}
{{- define "llmpool.selectorLabels" -}}
app.kubernetes.io/name: llmpool-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "llmpool.labels" -}}
{{ include "llmpool.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: llmpool
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ include "llmpool.chart" . }}
{{- end -}}

{{- define "llmpool.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "llmpool.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "llmpool.peeringName" -}}
{{- default (include "llmpool.fullname" .) .Values.peering.name -}}
{{- end -}}

{{- define "llmpool.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "llmpool.pickerImage" -}}
{{- printf "%s:%s" .Values.picker.image.repository (default .Chart.AppVersion .Values.picker.image.tag) -}}
{{- end -}}

{{/* The sample pool's name (default per kind) and namespace. */}}
{{- define "llmpool.sampleName" -}}
{{- $defaults := dict "cpu" "tiny-cpu" "gpu" "llama-gpu" "npu" "qwen-npu" -}}
{{- default (get $defaults .Values.sample.kind) .Values.sample.name -}}
{{- end -}}

{{- define "llmpool.sampleNamespace" -}}
{{- default .Release.Namespace .Values.sample.namespace -}}
{{- end -}}

{{/* The pool the HTTPRoute targets: gateway.route.pool, else the sample pool. */}}
{{- define "llmpool.routePool" -}}
{{- if .Values.gateway.route.pool -}}
{{- .Values.gateway.route.pool -}}
{{- else if .Values.sample.enabled -}}
{{- include "llmpool.sampleName" . -}}
{{- else -}}
{{- fail "gateway.route.pool is required when gateway.provider is set and sample.enabled is false (name the LLMPool whose InferencePool the HTTPRoute should target)" -}}
{{- end -}}
{{- end -}}

{{- define "llmpool.routeNamespace" -}}
{{- if .Values.gateway.route.namespace -}}
{{- .Values.gateway.route.namespace -}}
{{- else if and .Values.sample.enabled (not .Values.gateway.route.pool) -}}
{{- include "llmpool.sampleNamespace" . -}}
{{- else -}}
{{- .Release.Namespace -}}
{{- end -}}
{{- end -}}

{{- define "llmpool.gatewayNamespace" -}}
{{- default (include "llmpool.routeNamespace" .) .Values.gateway.namespace -}}
{{- end -}}

{{- define "llmpool.gatewayClassName" -}}
{{- default .Values.gateway.provider .Values.gateway.className -}}
{{- end -}}
