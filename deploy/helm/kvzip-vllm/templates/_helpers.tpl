{{/* Chart name, truncated to the 63 characters of a DNS label. */}}
{{- define "kvzip-vllm.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-qualified name. */}}
{{- define "kvzip-vllm.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else if contains (include "kvzip-vllm.name" .) .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "kvzip-vllm.name" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "kvzip-vllm.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kvzip-vllm.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "kvzip-vllm.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "kvzip-vllm.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* The engine image: image.repository, or kvzip-vllm-<engine>. */}}
{{- define "kvzip-vllm.image" -}}
{{- $repo := .Values.image.repository | default (printf "kvzip-vllm-%s" .Values.engine) -}}
{{- printf "%s:%s" $repo (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/* The `model_name` label of the engine's metrics (--served-model-name). */}}
{{- define "kvzip-vllm.servedName" -}}
{{- .Values.model.servedName | default .Values.model.name }}
{{- end }}
