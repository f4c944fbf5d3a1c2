{{/*
RBAC rules, in step with operator/RBAC.md and fleet_operator/apply.py (the one module that
calls the API) plus what kopf itself does: only the verbs the operator uses; no wildcards,
no secrets. Server-side apply needs `patch`, and `create` for an object that does not exist yet.
*/}}

{{- define "inferencefleet.clusterRules" -}}
# Placement reads GPU nodes; a node's sharing profile is switched by a label (merge patch).
- apiGroups: [""]
  resources: ["nodes"]
  verbs: ["get", "list", "patch"]
{{- end }}

{{- define "inferencefleet.fleetRules" -}}
# kopf lists and watches fleets and patches its finalizer and annotations on them.
- apiGroups: ["inferencefleet.dev"]
  resources: ["inferencefleets"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["inferencefleet.dev"]
  resources: ["inferencefleets/status"]
  verbs: ["patch"]
# Children carry an owner reference with blockOwnerDeletion, which needs this where the
# OwnerReferencesPermissionEnforcement admission plugin is on (OpenShift, for one).
- apiGroups: ["inferencefleet.dev"]
  resources: ["inferencefleets/finalizers"]
  verbs: ["update"]
# The worker Deployment: server-side applied, read for status, watched for prompt status.
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "patch"]
# Batching ConfigMap, headless Service, PodDisruptionBudget: server-side applied only.
# Children are deleted by garbage collection through their owner reference, not by us.
- apiGroups: [""]
  resources: ["services", "configmaps"]
  verbs: ["create", "patch"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["create", "patch"]
# Status reports placement per node from the worker pods.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- end }}

{{- define "inferencefleet.devicePluginRules" -}}
- apiGroups: [""]
  resources: ["configmaps"]
  resourceNames: [{{ .Values.devicePlugin.configMapName | quote }}]
  verbs: ["get", "patch"]
# create cannot be limited by name (the object does not exist yet).
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["create"]
{{- end }}
