{{/*
Expand the name of the chart.
*/}}
{{- define "inferencefleet.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Create a default fully qualified app name, truncated at 63 characters (the DNS label limit).
If the release name contains the chart name, it is used as the full name.
*/}}
{{- define "inferencefleet.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Chart name and version, as used by the chart label.
*/}}
{{- define "inferencefleet.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Common labels.
*/}}
{{- define "inferencefleet.labels" -}}
helm.sh/chart: {{ include "inferencefleet.chart" . }}
{{ include "inferencefleet.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: inferencefleet
{{- end }}

{{/*
Selector labels of the operator pod.
*/}}
{{- define "inferencefleet.selectorLabels" -}}
app.kubernetes.io/name: {{ include "inferencefleet.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/*
Name of the operator's ServiceAccount.
*/}}
{{- define "inferencefleet.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "inferencefleet.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Operator image reference.
*/}}
{{- define "inferencefleet.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/*
Worker image reference (the default for fleets without spec.image).
*/}}
{{- define "inferencefleet.workerImage" -}}
{{- printf "%s:%s" .Values.workerImage.repository (default .Chart.AppVersion .Values.workerImage.tag) }}
{{- end }}

{{/*
The namespaces the operator watches, as a JSON list: watchNamespaces, or the release namespace.
(Only meaningful without watchAllNamespaces.)
*/}}
{{- define "inferencefleet.watchNamespaces" -}}
{{- if .Values.watchNamespaces }}
{{- toJson .Values.watchNamespaces }}
{{- else }}
{{- toJson (list .Release.Namespace) }}
{{- end }}
{{- end }}

{{/*
The operator's ServiceAccount as the apiserver names the user it authenticates.
*/}}
{{- define "inferencefleet.serviceAccountUser" -}}
system:serviceaccount:{{ .Release.Namespace }}:{{ include "inferencefleet.serviceAccountName" . }}
{{- end }}

{{/*
The operator's command-line arguments (after `inferencefleet operator`).
*/}}
{{- define "inferencefleet.operatorArgs" -}}
{{- if .Values.watchAllNamespaces }}
- --all-namespaces
{{- else }}
{{- range (include "inferencefleet.watchNamespaces" . | fromJsonArray) }}
- --namespace={{ . }}
{{- end }}
{{- end }}
- --device-plugin-configmap={{ .Values.devicePlugin.configMapName }}
- --device-plugin-namespace={{ .Values.devicePlugin.namespace }}
- --config-volume-delay={{ .Values.devicePlugin.configVolumeDelaySeconds }}
- --worker-image={{ include "inferencefleet.workerImage" . }}
{{- if ne .Values.workerDevice "cuda" }}
- --worker-device={{ .Values.workerDevice }}
{{- end }}
- --liveness-port={{ .Values.healthPort }}
- --standalone
- --log-level={{ .Values.logLevel }}
{{- range .Values.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end }}

{{/*
The label the operator puts on every worker pod, whose value is the fleet's name.
*/}}
{{- define "inferencefleet.workerFleetLabel" -}}
inferencefleet.dev/fleet
{{- end }}
