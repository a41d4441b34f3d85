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
