{{/* Chart name, truncated to the 63 characters a label value allows. */}}
{{- define "ddpm-worker.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-qualified name: the release name alone when it already contains the chart name. */}}
{{- define "ddpm-worker.fullname" -}}
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

{{- define "ddpm-worker.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels; callers add app.kubernetes.io/component. */}}
{{- define "ddpm-worker.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ddpm-worker.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "ddpm-worker.labels" -}}
helm.sh/chart: {{ include "ddpm-worker.chart" . }}
{{ include "ddpm-worker.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* repository:tag, or repository@digest when a digest is pinned. */}}
{{- define "ddpm-worker.image" -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}
{{- end }}

{{/* host:port for a listen flag; an IPv6 host is bracketed. */}}
{{- define "ddpm-worker.hostPort" -}}
{{- $host := index . 0 -}}
{{- $port := index . 1 -}}
{{- if contains ":" $host -}}
[{{ $host }}]:{{ $port }}
{{- else -}}
{{ $host }}:{{ $port }}
{{- end -}}
{{- end }}

{{/* True ("true") when the serve queue is the embedded SQLite file. */}}
{{- define "ddpm-worker.sqliteQueue" -}}
{{- if eq .Values.serve.queue.type "sqlite" }}true{{ end -}}
{{- end }}

{{- define "ddpm-worker.queueClaimName" -}}
{{- .Values.serve.queue.sqlite.persistence.existingClaim | default (printf "%s-queue" (include "ddpm-worker.fullname" .)) }}
{{- end }}

{{/*
Render-time checks of the serve values that the JSON schema cannot express. Fails the render with a
message that says what to change.
*/}}
{{- define "ddpm-worker.validateServe" -}}
{{- $s := .Values.serve }}
{{- if not (has $s.queue.type (list "sqlite" "nats")) }}
{{- fail (printf "serve.queue.type is %q: use \"sqlite\" or \"nats\"." (toString $s.queue.type)) }}
{{- end }}
{{- if eq $s.queue.type "nats" }}
{{- $n := $s.queue.nats | default dict }}
{{- if not (regexMatch "^nats://[^/@,\\s]+$" (toString $n.url)) }}
{{- fail (printf "serve.queue.type is \"nats\" but serve.queue.nats.url is %q: set it to nats://HOST[:PORT] of a JetStream-enabled NATS server (no path, no credentials), e.g. nats://nats.nats.svc:4222." (toString $n.url)) }}
{{- end }}
{{- if not (regexMatch "^[A-Za-z0-9_-]+$" (toString $n.namespace)) }}
{{- fail (printf "serve.queue.nats.namespace is %q: it must match [A-Za-z0-9_-]+." (toString $n.namespace)) }}
{{- end }}
{{- end }}
{{- if and (include "ddpm-worker.sqliteQueue" .) (gt (int $s.replicas) 1) }}
{{- fail (printf "serve.replicas is %d, but serve.queue.type is \"sqlite\": the SQLite queue is one file on a ReadWriteOnce PersistentVolumeClaim and supports exactly ONE serving process. Set serve.replicas to 1 (or 0 to stop the service)." (int $s.replicas)) }}
{{- end }}
{{- $limits := $s.resources.limits | default dict }}
{{- $requests := $s.resources.requests | default dict }}
{{- if and (hasKey $requests "nvidia.com/gpu") (ne (toString (index $requests "nvidia.com/gpu")) (toString (index $limits "nvidia.com/gpu"))) }}
{{- fail "serve.resources: requests[\"nvidia.com/gpu\"] must equal limits[\"nvidia.com/gpu\"] (GPUs cannot be overcommitted); set the GPU count in limits only." }}
{{- end }}
{{- $preStop := 0.0 }}
{{- if semverCompare ">=1.30-0" .Capabilities.KubeVersion.Version }}
{{- $preStop = float64 $s.preStopSleepSeconds }}
{{- end }}
{{- if le (float64 $s.terminationGracePeriodSeconds) (addf (float64 $s.graceSeconds) $preStop) }}
{{- fail (printf "serve.terminationGracePeriodSeconds (%v) must be greater than serve.graceSeconds (%v) plus serve.preStopSleepSeconds (%v): otherwise the kubelet kills the worker before running shards are finished or given back." $s.terminationGracePeriodSeconds $s.graceSeconds $preStop) }}
{{- end }}
{{- if and (eq $s.output.type "s3") (not $s.output.s3.bucket) }}
{{- fail "serve.output.type is \"s3\" but serve.output.s3.bucket is empty." }}
{{- end }}
{{- if not $s.models }}
{{- fail "serve.models is empty: list at least one {name, path} model to serve." }}
{{- end }}
{{- if or (gt (int $s.minPriority) (int $s.maxPriority)) (gt (sub (int $s.maxPriority) (int $s.minPriority)) 100) }}
{{- fail (printf "serve.minPriority (%v) and serve.maxPriority (%v): min must not exceed max, and the range holds at most 101 values (each is a NATS consumer)." $s.minPriority $s.maxPriority) }}
{{- end }}
{{- if and $s.tls.clientCaSecret (not $s.tls.existingSecret) }}
{{- fail "serve.tls.clientCaSecret is set but serve.tls.existingSecret is empty: mTLS needs the server's own certificate too." }}
{{- end }}
{{- if and $s.tls.existingSecret (eq (int $s.tls.healthPort) (int $s.grpcPort)) }}
{{- fail "serve.tls.healthPort equals serve.grpcPort: the plaintext health port must be another port." }}
{{- end }}
{{- /* Two listeners on one port: the second bind fails and the pod crash-loops. */}}
{{- if and $s.tls.existingSecret $s.metrics.enabled (eq (int $s.tls.healthPort) (int $s.metrics.port)) }}
{{- fail "serve.tls.healthPort equals serve.metrics.port: the plaintext health port must be another port." }}
{{- end }}
{{- end }}

{{/* Pod-level fields shared by the serve pod and the generate Job. */}}
{{- define "ddpm-worker.podPlacement" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
serviceAccountName: {{ include "ddpm-worker.serviceAccountName" . }}
automountServiceAccountToken: {{ .Values.serviceAccount.automountServiceAccountToken }}
{{- with .Values.runtimeClassName }}
runtimeClassName: {{ . }}
{{- end }}
{{- with .Values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.podSecurityContext }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{- define "ddpm-worker.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- .Values.serviceAccount.name | default (include "ddpm-worker.fullname" .) }}
{{- else }}
{{- .Values.serviceAccount.name | default "default" }}
{{- end }}
{{- end }}

{{/* /dev/shm (libtorch) and /tmp (read-only root filesystem). */}}
{{- define "ddpm-worker.scratchVolumes" -}}
- name: dshm
  emptyDir:
    medium: Memory
    {{- with .Values.shm.sizeLimit }}
    sizeLimit: {{ . }}
    {{- end }}
- name: tmp
  emptyDir:
    {{- with .Values.tmp.sizeLimit }}
    sizeLimit: {{ . }}
    {{- end }}
{{- end }}

{{/* The serve container's environment: HF cache, S3 endpoint and credentials, extra env. */}}
{{- define "ddpm-worker.env" -}}
{{- $aws := .Values.aws }}
{{- $env := list }}
{{- with .Values.models.hfHome }}
{{- $env = append $env (dict "name" "HF_HOME" "value" .) }}
{{- end }}
{{- with $aws.endpointUrl }}
{{- $env = append $env (dict "name" "AWS_ENDPOINT_URL" "value" .) }}
{{- end }}
{{- with $aws.region }}
{{- $env = append $env (dict "name" "AWS_REGION" "value" .) }}
{{- end }}
{{- with $aws.existingSecret }}
{{- $env = append $env (dict "name" "AWS_ACCESS_KEY_ID" "valueFrom" (dict "secretKeyRef" (dict "name" . "key" $aws.accessKeyIdKey))) }}
{{- $env = append $env (dict "name" "AWS_SECRET_ACCESS_KEY" "valueFrom" (dict "secretKeyRef" (dict "name" . "key" $aws.secretAccessKeyKey))) }}
{{- if $aws.sessionTokenKey }}
{{- $env = append $env (dict "name" "AWS_SESSION_TOKEN" "valueFrom" (dict "secretKeyRef" (dict "name" . "key" $aws.sessionTokenKey))) }}
{{- end }}
{{- end }}
{{- $env = concat $env .Values.serve.extraEnv }}
{{- if $env }}
env:
  {{- toYaml $env | nindent 2 }}
{{- end }}
{{- end }}
