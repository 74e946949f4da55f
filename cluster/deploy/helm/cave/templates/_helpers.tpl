{{/* Names and labels. */}}
{{- define "cave.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "cave.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "cave.labels" -}}
{{ include "cave.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "cave.image" -}}
{{- $image := merge (deepCopy (.override | default dict)) .image -}}
image: {{ printf "%s:%s" $image.repository $image.tag | quote }}
imagePullPolicy: {{ $image.pullPolicy }}
{{- end -}}

{{/* Serve's HAProxy ingress, for every Ray process of every pod (docs/ingress.md): the switch
and cluster.ingress.TUNED_ENV. Ports stay at Serve's defaults: a pod has its own network. */}}
{{- define "cave.ingressEnv" -}}
- {name: RAY_SERVE_ENABLE_HA_PROXY, value: "1"}
- {name: RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD, value: "0"}
- {name: RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE, value: "1000"}
- {name: RAY_SERVE_LOG_TO_STDERR, value: "0"}
- {name: RAY_SERVE_HAPROXY_NBTHREAD, value: "1"}
- {name: RAY_SERVE_HAPROXY_METRICS_ENABLED, value: "0"}
{{- end -}}

{{/* Ray's token authentication on every Ray container. The operator's authOptions sets the same
variable and adds RAY_AUTH_TOKEN from its Secret; set here too, an operator that dropped
authOptions would give no token, and `ray start` refuses token mode without one: the cluster
does not start rather than start open. */}}
{{- define "cave.rayAuthEnv" -}}
- {name: RAY_AUTH_MODE, value: token}
{{- end -}}

{{/* Where the API replicas read their secrets (the *_FILE settings); mounted in the head only. */}}
{{- define "cave.secretsDir" -}}
/etc/cave/secrets
{{- end -}}

{{/* Head, GPU and autoscaler containers: no privilege at all. */}}
{{- define "cave.restrictedContainer" -}}
allowPrivilegeEscalation: false
capabilities:
  drop: [ALL]
runAsNonRoot: true
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "cave.restrictedPod" -}}
runAsNonRoot: true
runAsUser: 1000
runAsGroup: 100
fsGroup: 100
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Sandbox hosts run Ray as root with what namespaces, cgroups and mounts need (values.yaml
sandbox.security; docs/deploy.md says why). */}}
{{- define "cave.sandboxContainer" -}}
{{- $security := .Values.sandbox.security -}}
runAsUser: 0
{{- if $security.privileged }}
privileged: true
{{- else }}
privileged: false
allowPrivilegeEscalation: true
capabilities:
  drop: [ALL]
  add: {{- toYaml $security.capabilities | nindent 4 }}
appArmorProfile:
  type: Unconfined
{{- end }}
seccompProfile: {{- toYaml $security.seccompProfile | nindent 2 }}
{{- end -}}

{{/* One sandbox worker group; `group` is .Values.sandbox or .Values.trustedPool. */}}
{{- define "cave.sandboxGroup" -}}
{{- $root := .root -}}
{{- $group := .group -}}
- groupName: {{ .name }}
  minReplicas: {{ $group.minReplicas }}
  maxReplicas: {{ $group.maxReplicas }}
  replicas: {{ $group.minReplicas }}
  rayStartParams: {}
  resources:
    cave_sandbox: {{ $group.capacity | quote }}
  {{- with .labels }}
  labels: {{- toYaml . | nindent 4 }}
  {{- end }}
  template:
    metadata:
      labels:
        {{- include "cave.selectorLabels" $root | nindent 8 }}
        app.kubernetes.io/component: {{ .name }}
    spec:
      {{- with $root.Values.imagePullSecrets }}
      imagePullSecrets: {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $group.nodeSelector }}
      nodeSelector: {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $group.tolerations }}
      tolerations: {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        seccompProfile: {{- toYaml $root.Values.sandbox.security.seccompProfile | nindent 10 }}
      containers:
        - name: ray-worker
          {{- include "cave.image" (dict "image" $root.Values.image) | nindent 10 }}
          env:
            {{- include "cave.rayAuthEnv" $root | nindent 12 }}
            {{- include "cave.ingressEnv" $root | nindent 12 }}
          resources: {{- toYaml $group.resources | nindent 12 }}
          securityContext: {{- include "cave.sandboxContainer" $root | nindent 12 }}
          volumeMounts:
            - {name: cave-state, mountPath: /run/cave}
      volumes:
        # CAVE_STATE_DIR: sandbox workspaces; overlay upper directories cannot live on the
        # container's own overlay root.
        - name: cave-state
          emptyDir: {}
{{- end -}}
