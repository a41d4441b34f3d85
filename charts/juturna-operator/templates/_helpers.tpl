{{/* app.kubernetes.io/name: the chart's name unless nameOverride says otherwise. */}}
{{- define "juturna-operator.name" -}}
{{- .Values.nameOverride | default .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The objects' names: the release's name (stable across upgrades: a renamed Deployment
     would run two operators for a moment), or fullnameOverride. */}}
{{- define "juturna-operator.fullname" -}}
{{- .Values.fullnameOverride | default .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "juturna-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- .Values.serviceAccount.name | default (include "juturna-operator.fullname" .) -}}
{{- else -}}
{{- .Values.serviceAccount.name | default "default" -}}
{{- end -}}
{{- end -}}

{{- define "juturna-operator.labels" -}}
{{ include "juturna-operator.selector" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* The labels that never change across upgrades: selectors use these and nothing else. */}}
{{- define "juturna-operator.selector" -}}
app.kubernetes.io/name: {{ include "juturna-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* The operator's image, and the runtime image of engine pod (the same unless set). */}}
{{- define "juturna-operator.image" -}}
{{- include "juturna-operator.imageRef" (list .Values.image .Chart.AppVersion) -}}
{{- end -}}

{{/* repository@digest where a digest is given (the tag is then ignored), else repository:tag
     (default: the chart's appVersion). Arguments: (list imageValues appVersion). */}}
{{- define "juturna-operator.imageRef" -}}
{{- $image := index . 0 -}}
{{- if $image.digest -}}
{{ $image.repository }}@{{ $image.digest }}
{{- else -}}
{{ $image.repository }}:{{ $image.tag | default (index . 1) }}
{{- end -}}
{{- end -}}

{{- define "juturna-operator.runtimeImage" -}}
{{- if .Values.runtimeImage.repository -}}
{{- include "juturna-operator.imageRef" (list .Values.runtimeImage .Chart.AppVersion) -}}
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

{{/* The operator's settings from values, as its container's env. extraEnv may add to
     these but not replace one (deployment.yaml refuses a name set here). */}}
{{- define "juturna-operator.env" -}}
# kopf's identity: the pod's name (its documented way; no passwd lookup).
- name: POD_ID
  valueFrom: {fieldRef: {fieldPath: metadata.name}}
- {name: JUTURNA_OPERATOR_ENGINE, value: {{ .Values.engine | quote }}}
- {name: JUTURNA_OPERATOR_PLUGIN_PATH, value: {{ .Values.pluginPath | quote }}}
- {name: JUTURNA_OPERATOR_WORKDIR, value: /var/lib/juturna-operator}
- {name: JUTURNA_OPERATOR_STOP_TIMEOUT, value: {{ .Values.stopTimeoutSeconds | quote }}}
- {name: JUTURNA_OPERATOR_HEALTH_INTERVAL, value: {{ .Values.healthIntervalSeconds | quote }}}
- {name: JUTURNA_OPERATOR_LOG_FORMAT, value: {{ .Values.logFormat | quote }}}
- {name: JUTURNA_OPERATOR_METRICS_PORT, value: {{ .Values.metrics.port | quote }}}
{{- if eq .Values.engine "pod" }}
- {name: JUTURNA_OPERATOR_RUNTIME_IMAGE, value: {{ include "juturna-operator.runtimeImage" . | quote }}}
- {name: JUTURNA_OPERATOR_RUNTIME_PULL_POLICY, value: {{ .Values.runtimeImage.pullPolicy | default .Values.image.pullPolicy | quote }}}
- {name: JUTURNA_OPERATOR_ALLOW_IMAGE_OVERRIDE, value: {{ .Values.allowImageOverride | quote }}}
- {name: JUTURNA_OPERATOR_POD_WORK_SIZE_LIMIT, value: {{ .Values.pipelinePod.workSizeLimit | default "" | quote }}}
- {name: JUTURNA_OPERATOR_POD_TMP_SIZE_LIMIT, value: {{ .Values.pipelinePod.tmpSizeLimit | default "" | quote }}}
- {name: JUTURNA_OPERATOR_POD_DEFAULT_RESOURCES, value: {{ .Values.pipelinePod.defaultResources | default dict | toJson | quote }}}
{{- /* A UID from --set or a values file may arrive as a number (a float64 from YAML, which
     toString would print as 1.00068e+09): it is printed as an integer. */}}
{{- $user := .Values.pipelinePod.user | default "" }}
- {name: JUTURNA_OPERATOR_POD_USER, value: {{ kindIs "string" $user | ternary $user (printf "%d" (int64 $user)) | quote }}}
{{- $pull := list }}
{{- range .Values.pipelinePod.imagePullSecrets }}{{ $pull = append $pull .name }}{{ end }}
- {name: JUTURNA_OPERATOR_POD_IMAGE_PULL_SECRETS, value: {{ join "," $pull | quote }}}
{{- if .Values.networkPolicy.enabled }}
{{- /* The operator's own pod first: it is what drives each worker. */}}
{{- $self := dict "namespaceSelector" (dict "matchLabels" (dict "kubernetes.io/metadata.name" .Release.Namespace)) "podSelector" (dict "matchLabels" (include "juturna-operator.selector" . | fromYaml)) }}
- {name: JUTURNA_OPERATOR_WORKER_PEERS, value: {{ prepend .Values.networkPolicy.workerPeers $self | toJson | quote }}}
{{- end }}
- {name: JUTURNA_OPERATOR_ALLOWED_VOLUME_TYPES, value: {{ join "," .Values.allowedVolumeTypes | quote }}}
- {name: JUTURNA_OPERATOR_ALLOWED_PRIORITY_CLASSES, value: {{ join "," .Values.allowedPriorityClasses | quote }}}
{{- end }}
{{- if eq .Values.engine "process" }}
- {name: JUTURNA_OPERATOR_PIPELINES_PER_PROCESS, value: {{ .Values.pipelinesPerProcess | quote }}}
{{- end }}
{{- if kindIs "slice" .Values.allowedBuiltins }}
- {name: JUTURNA_OPERATOR_ALLOWED_BUILTINS, value: {{ join "," .Values.allowedBuiltins | quote }}}
{{- end }}
- {name: JUTURNA_OPERATOR_ALLOW_ENV_REFERENCES, value: {{ .Values.allowEnvReferences | quote }}}
- name: JUTURNA_OPERATOR_RUNTIMES
  value: {{ include "juturna-operator.runtimes" . | quote }}
{{- with .Values.defaultRuntime }}
- {name: JUTURNA_OPERATOR_DEFAULT_RUNTIME, value: {{ . | quote }}}
{{- end }}
{{- end -}}
