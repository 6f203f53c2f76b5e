{{/*
Name of the chart, or nameOverride.
*/}}
{{- define "klio.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Name of the release's objects: fullnameOverride, else the release name when it
already contains the chart name, else "<release>-<chart>". At most 63 characters.
*/}}
{{- define "klio.fullname" -}}
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
The helm.sh/chart label: "<chart>-<version>", "+" replaced (not allowed in label values).
*/}}
{{- define "klio.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels of every object.
*/}}
{{- define "klio.labels" -}}
helm.sh/chart: {{ include "klio.chart" . }}
{{ include "klio.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: klio
{{- end }}

{{/*
Labels that select the operator's pods; never change them in an upgrade
(a Deployment's selector is immutable).
*/}}
{{- define "klio.selectorLabels" -}}
app.kubernetes.io/name: {{ include "klio.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
The operator's ServiceAccount.
*/}}
{{- define "klio.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (printf "%s-operator" (include "klio.fullname" .)) .Values.serviceAccount.name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The operator's image: repository:tag, the tag defaulting to the appVersion.
*/}}
{{- define "klio.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/*
The permissions the operator needs on Servers and the objects it makes of them.
Shared by the ClusterRole and the namespaced Role. See docs/kubernetes.md.
*/}}
{{- define "klio.operatorRules" -}}
- apiGroups: ["klio.enterprisedb.io"]
  resources: ["servers"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["klio.enterprisedb.io"]
  resources: ["servers/status"]
  verbs: ["get", "patch", "update"]
# The StatefulSet and Service carry an owner reference with blockOwnerDeletion; clusters that
# enforce owner-reference permissions (OwnerReferencesPermissionEnforcement, e.g. OpenShift)
# require this to set it.
- apiGroups: ["klio.enterprisedb.io"]
  resources: ["servers/finalizers"]
  verbs: ["update"]
- apiGroups: ["apps"]
  resources: ["statefulsets"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: [""]
  resources: ["services"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: [""]
  resources: ["persistentvolumeclaims"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}

{{/*
Labels of the CNPG-I plugin's objects; its pods are selected by another name than the
operator's, so the two Deployments never select each other's pods.
*/}}
{{- define "klio.pluginSelectorLabels" -}}
app.kubernetes.io/name: {{ include "klio.name" . }}-cnpg-plugin
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "klio.pluginLabels" -}}
helm.sh/chart: {{ include "klio.chart" . }}
{{ include "klio.pluginSelectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: cnpg-plugin
app.kubernetes.io/part-of: klio
{{- end }}

{{/*
Labels of the aggregated API service's objects; its pods are selected by a name of their
own, like the plugin's.
*/}}
{{- define "klio.apiServiceSelectorLabels" -}}
app.kubernetes.io/name: {{ include "klio.name" . }}-api-service
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "klio.apiServiceLabels" -}}
helm.sh/chart: {{ include "klio.chart" . }}
{{ include "klio.apiServiceSelectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: api-service
app.kubernetes.io/part-of: klio
{{- end }}
