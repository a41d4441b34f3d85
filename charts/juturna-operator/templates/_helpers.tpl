{{- define "juturna-operator.name" -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "juturna-operator.labels" -}}
app.kubernetes.io/name: juturna-operator
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end -}}

{{- define "juturna-operator.selector" -}}
app.kubernetes.io/name: juturna-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* The operator's image, and the runtime image of engine pod (the same unless set). */}}
{{- define "juturna-operator.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "juturna-operator.runtimeImage" -}}
{{- if .Values.runtimeImage.repository -}}
{{ .Values.runtimeImage.repository }}:{{ .Values.runtimeImage.tag | default .Chart.AppVersion }}
{{- else -}}
{{ include "juturna-operator.image" . }}
{{- end -}}
{{- end -}}

{{/* What the operator does with Pipelines and Events: the same in both RBAC modes. */}}
{{- define "juturna-operator.pipelineRules" -}}
- apiGroups: [juturna.io]
  resources: [pipelines]
  verbs: [get, list, watch, patch]
- apiGroups: [juturna.io]
  resources: [pipelines/status]
  verbs: [get, patch]
- apiGroups: [""]
  resources: [events]
  verbs: [create]
{{- if eq .Values.engine "pod" }}
{{- /* Engine pod: a Pod per Pipeline (create, its dry run included; get, list and watch:
     the watch on them; patch: its revision annotation; delete) and its token Secret (create;
     get: read back by an adopting operator, and checked for its owner before a delete). No
     pods/log, no list or watch of Secrets. */}}
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch, create, delete, patch]
- apiGroups: [""]
  resources: [secrets]
  verbs: [get, create, delete]
{{- /* Why the kubelet evicted a pipeline pod, where the pod's status lost it: its Event. */}}
- apiGroups: [""]
  resources: [events]
  verbs: [list]
{{- /* Each Pipeline's NetworkPolicy: who may reach its pods (values networkPolicy). */}}
- apiGroups: [networking.k8s.io]
  resources: [networkpolicies]
  verbs: [get, create, patch, delete]
{{- /* The Service of each Pipeline that listens: made, its selector moved, removed. */}}
- apiGroups: [""]
  resources: [services]
  verbs: [get, create, patch, delete]
{{- end }}
{{- end -}}

{{/* JUTURNA_OPERATOR_RUNTIMES: URLs from values; tokens as files from mounted Secrets. */}}
{{- define "juturna-operator.runtimes" -}}
{{- $out := dict -}}
{{- range $name, $rt := .Values.runtimes -}}
{{- $entry := dict "url" $rt.url -}}
{{- if $rt.tokenSecret -}}
{{- $_ := set $entry "tokenFile" (printf "/var/run/secrets/juturna-runtimes/%s/%s" $name $rt.tokenSecret.key) -}}
{{- end -}}
{{- $_ := set $out $name $entry -}}
{{- end -}}
{{- toJson $out -}}
{{- end -}}
