{{/*
RBAC rules, kept in one place and in step with operator/RBAC.md: only the verbs the operator
uses; no wildcards, no secrets.
*/}}

{{- define "inferencefleet.clusterRules" -}}
# Placement reads GPU nodes; the sharing profile is selected by a node label.
- apiGroups: [""]
  resources: ["nodes"]
  verbs: ["get", "list", "watch", "patch"]
# kopf discovers the InferenceFleet resource and notices it being (re)installed.
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["list", "watch"]
# kopf resolves the watched namespaces.
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["list", "watch"]
{{- end }}

{{- define "inferencefleet.fleetRules" -}}
- apiGroups: ["inferencefleet.dev"]
  resources: ["inferencefleets"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["inferencefleet.dev"]
  resources: ["inferencefleets/status"]
  verbs: ["get", "patch"]
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["services", "configmaps"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# Status reports placement per node from the worker pods.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["", "events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}

{{- define "inferencefleet.devicePluginRules" -}}
- apiGroups: [""]
  resources: ["configmaps"]
  resourceNames: [{{ .Values.devicePlugin.configMapName | quote }}]
  verbs: ["get", "patch", "update"]
# create cannot be limited by name (the object does not exist yet).
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["create"]
{{- end }}
