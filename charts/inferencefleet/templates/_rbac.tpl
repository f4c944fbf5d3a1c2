{{/*
RBAC rules, in step with operator/RBAC.md and fleet_operator/kube.py (the one module that
writes to the API) plus what kopf itself does (the watches behind the operator's indexes):
only the verbs the operator uses; no wildcards, no secrets. Server-side apply needs `patch`, and `create` for an object that does not exist yet.
*/}}

{{- define "inferencefleet.clusterRules" -}}
# An index of GPU nodes (a watch); a node's sharing profile is switched by a label (merge patch).
- apiGroups: [""]
  resources: ["nodes"]
  verbs: ["list", "watch", "patch"]
{{- end }}

{{- define "inferencefleet.fleetRules" -}}
# kopf lists and watches fleets and patches its finalizer and annotations on them.
- apiGroups: ["inferencefleet.dev"]
  resources: ["inferencefleets"]
  verbs: ["list", "watch", "patch"]
- apiGroups: ["inferencefleet.dev"]
  resources: ["inferencefleets/status"]
  verbs: ["patch"]
# Children carry an owner reference with blockOwnerDeletion, which needs this where the
# OwnerReferencesPermissionEnforcement admission plugin is on (OpenShift, for one).
- apiGroups: ["inferencefleet.dev"]
  resources: ["inferencefleets/finalizers"]
  verbs: ["update"]
# The children (worker Deployment, batching ConfigMap, headless Service, PodDisruptionBudget):
# server-side applied, and watched (an index: their status, and whether a same-named object
# is someone else's). They are deleted by garbage collection through their owner reference.
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["list", "watch", "create", "patch"]
- apiGroups: [""]
  resources: ["services", "configmaps"]
  verbs: ["list", "watch", "create", "patch"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["list", "watch", "create", "patch"]
# spec.tune: a Job running `inferencefleet tune`, server-side applied and watched (its end is
# read from its pod's termination message). Finished Jobs expire by their TTL.
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["list", "watch", "create", "patch"]
# Status reports placement per node from the worker pods (an index of them), and the tune
# result from the tune pod's termination message.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch"]
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
