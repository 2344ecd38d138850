{{/*
Names and labels shared by every template.
*/}}

{{/* The chart name, overridable. */}}
{{- define "event-router.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The resource-name prefix: <release>-<name>, or the release name when it already holds the name. */}}
{{- define "event-router.fullname" -}}
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

{{/* Name of the operator's Deployment, Service and (by default) ServiceAccount. */}}
{{- define "event-router.operatorName" -}}
{{- printf "%s-operator" (include "event-router.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "event-router.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object the chart renders. */}}
{{- define "event-router.labels" -}}
helm.sh/chart: {{ include "event-router.chart" . }}
app.kubernetes.io/part-of: event-router
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
{{- end }}

{{/* Selector labels of the operator pods. Never change them: Deployment selectors are immutable. */}}
{{- define "event-router.operatorSelectorLabels" -}}
app.kubernetes.io/name: {{ include "event-router.name" . }}-operator
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "event-router.operatorLabels" -}}
{{ include "event-router.labels" . }}
{{ include "event-router.operatorSelectorLabels" . }}
{{- end }}

{{/* Labels of objects that belong to the release but not to the operator pods. */}}
{{- define "event-router.commonLabels" -}}
{{ include "event-router.labels" . }}
app.kubernetes.io/name: {{ include "event-router.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "event-router.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "event-router.operatorName" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "event-router.leaseName" -}}
{{- default (printf "%s-leader" (include "event-router.fullname" .)) .Values.operator.leaderElection.leaseName }}
{{- end }}

{{/* The operator image reference: repository@digest, else repository:tag (tag defaults to appVersion). */}}
{{- define "event-router.operatorImage" -}}
{{- $img := .Values.operator.image }}
{{- if $img.digest }}
{{- printf "%s@%s" $img.repository $img.digest }}
{{- else }}
{{- printf "%s:%s" $img.repository (default .Chart.AppVersion $img.tag) }}
{{- end }}
{{- end }}

{{/* Labels and annotations inserted into the CRD's metadata (indented two spaces). */}}
{{- define "event-router.crdMetadata" -}}
{{- if .Values.crds.keep }}
  annotations:
    helm.sh/resource-policy: keep
{{- end }}
  labels:
    {{- include "event-router.commonLabels" . | nindent 4 }}
{{- end }}

{{/* RBAC rules for what the reconcile of an EventRouter touches in the namespace it lives in. */}}
{{- define "event-router.namespacedRules" -}}
- apiGroups: ["eventrouter.io"]
  resources: ["eventrouters"]
  verbs: ["get", "list", "watch", "patch", "update"]
- apiGroups: ["eventrouter.io"]
  resources: ["eventrouters/status"]
  verbs: ["get", "patch", "update"]
- apiGroups: ["eventrouter.io"]
  resources: ["eventrouters/finalizers"]
  verbs: ["update"]
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
- apiGroups: [""]
  resources: ["services", "serviceaccounts"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
- apiGroups: ["autoscaling"]
  resources: ["horizontalpodautoscalers"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
# The RabbitMQ URL comes from the Secret the EventRouter names, and the Secrets its spec.auth
# names are checked for their key (never kept); read only.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"]
- apiGroups: ["", "events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
- apiGroups: ["monitoring.coreos.com"]
  resources: ["servicemonitors"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
- apiGroups: ["keda.sh"]
  resources: ["scaledobjects"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
{{- end }}
