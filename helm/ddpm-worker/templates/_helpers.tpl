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

{{/* The serve pods' selector labels, as a YAML map (for selectors built as data). */}}
{{- define "ddpm-worker.serveSelector" -}}
{{- $l := fromYaml (include "ddpm-worker.selectorLabels" .) }}
{{- $_ := set $l "app.kubernetes.io/component" "serve" }}
{{- toYaml $l }}
{{- end }}

{{/*
Pod template labels, from (list context component extraLabels): the selector labels and component
(which win), then extraLabels, then commonLabels. No chart version, so upgrading the chart alone does
not replace the pods.
*/}}
{{- define "ddpm-worker.podLabels" -}}
{{- $ctx := index . 0 }}
{{- $l := fromYaml (include "ddpm-worker.selectorLabels" $ctx) }}
{{- $_ := set $l "app.kubernetes.io/component" (index . 1) }}
{{- toYaml (merge $l (deepCopy (index . 2 | default dict)) (deepCopy ($ctx.Values.commonLabels | default dict))) }}
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

{{/* True ("true") when a serve model is a Hugging Face hub id: org/name, as ddpm-worker tells them apart. */}}
{{- define "ddpm-worker.hubModels" -}}
{{- range .Values.serve.models }}
{{- if regexMatch "^[A-Za-z0-9_-][A-Za-z0-9._-]*/[A-Za-z0-9_-][A-Za-z0-9._-]*$" (toString .path) }}true{{ end }}
{{- end }}
{{- end }}

{{/* True ("true") when models.hfHomeVolume is mounted writable at models.hfHome in the serve pod. */}}
{{- define "ddpm-worker.hfHomeVolume" -}}
{{- if and .Values.models.hfHome .Values.models.hfHomeVolume (include "ddpm-worker.hubModels" .) }}true{{ end }}
{{- end }}

{{/* models.volume, with readOnly: true on a ReadOnlyMany claim (some drivers attach it to several nodes
only read-only). */}}
{{- define "ddpm-worker.modelsVolume" -}}
{{- $v := deepCopy .Values.models.volume }}
{{- if and (hasKey $v "persistentVolumeClaim") (eq .Values.models.accessMode "ReadOnlyMany") }}
{{- $_ := set $v.persistentVolumeClaim "readOnly" true }}
{{- end }}
{{- toYaml $v }}
{{- end }}

{{/*
Chart-wide render-time checks (the labels on every object). Included by serve-deployment.yaml,
generate-job.yaml and serviceaccount.yaml, so that any render with objects of its own runs them.
*/}}
{{- define "ddpm-worker.validate" -}}
{{- /* A chart key in commonLabels would be a duplicate key in every object's labels, and in a pod template
it would break the Deployment's selector. */}}
{{- $own := list "app.kubernetes.io/name" "app.kubernetes.io/instance" "app.kubernetes.io/component" "app.kubernetes.io/version" "app.kubernetes.io/managed-by" "helm.sh/chart" }}
{{- range $k, $_ := .Values.commonLabels }}
{{- if has $k $own }}
{{- fail (printf "commonLabels sets %q, a label the chart manages itself (it selects the pods or names the release): remove it." $k) }}
{{- end }}
{{- end }}
{{- range $k, $_ := .Values.serve.podLabels }}
{{- if has $k $own }}
{{- fail (printf "serve.podLabels sets %q, a label the chart manages itself (it selects the pods or names the release): remove it." $k) }}
{{- end }}
{{- end }}
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
{{- if not (regexMatch "^(nats|tls)://[^/@,\\s]+(,((nats|tls)://)?[^/@,\\s]+)*$" (toString $n.url)) }}
{{- fail (printf "serve.queue.type is \"nats\" but serve.queue.nats.url is %q: set it to nats://HOST[:PORT] or tls://HOST[:PORT] of a JetStream-enabled NATS server, or every server of a NATS cluster comma-separated (nats://nats-0.nats:4222,nats-1.nats:4222,nats-2.nats:4222); no path, no credentials (see serve.queue.nats.auth)." (toString $n.url)) }}
{{- end }}
{{- $auth := $n.auth | default dict }}
{{- $given := list }}
{{- range $k := list "credsSecret" "userSecret" "tokenSecret" }}
{{- if index $auth $k }}{{ $given = append $given $k }}{{ end }}
{{- end }}
{{- if gt (len $given) 1 }}
{{- fail (printf "serve.queue.nats.auth sets %s: a NATS connection uses one kind of credentials (a .creds file, a user and password, or a token). Keep one." (join " and " $given)) }}
{{- end }}
{{- if not (regexMatch "^[A-Za-z0-9_-]+$" (toString $n.namespace)) }}
{{- fail (printf "serve.queue.nats.namespace is %q: it must match [A-Za-z0-9_-]+." (toString $n.namespace)) }}
{{- end }}
{{- end }}
{{- include "ddpm-worker.validateAutoscaling" . }}
{{- if and (include "ddpm-worker.sqliteQueue" .) (gt (int $s.replicas) 1) }}
{{- fail (printf "serve.replicas is %d, but serve.queue.type is \"sqlite\": the SQLite queue is one file on a ReadWriteOnce PersistentVolumeClaim and supports exactly ONE serving process. Set serve.replicas to 1 (or 0 to stop the service)." (int $s.replicas)) }}
{{- end }}
{{- /* Several replicas land on several nodes (one GPU node each, as a rule), and every one mounts the models
and, with a "file" output, the output volume. The chart cannot read an existing claim's access mode, so
the values declare it (models.accessMode, output.accessMode). */}}
{{- $pods := int (include "ddpm-worker.servePods" .) }}
{{- if gt $pods 1 }}
{{- $podsText := printf "serve.replicas is %d" (int $s.replicas) }}
{{- if and $s.autoscaling $s.autoscaling.enabled }}
{{- $podsText = printf "serve runs up to %d pods (serve.autoscaling.maxReplicaCount %d, and the api pods)" $pods (int $s.autoscaling.maxReplicaCount) }}
{{- end }}
{{- $mv := .Values.models.volume }}
{{- if and (include "ddpm-worker.serveModelsVolume" .) (hasKey $mv "persistentVolumeClaim") (not (has .Values.models.accessMode (list "ReadOnlyMany" "ReadWriteMany"))) }}
{{- fail (printf "%s: every serve pod mounts models.volume (claim %q), on its own node. A %s claim attaches to one node only, so pods on other nodes would hang in ContainerCreating (Multi-Attach error). If the claim is ReadOnlyMany or ReadWriteMany, declare it with models.accessMode (the chart cannot read an existing claim's access mode); otherwise set serve.replicas to 1, or load the models from s3:// or hub ids with a models.volume that is not a claim." $podsText (toString $mv.persistentVolumeClaim.claimName) (toString .Values.models.accessMode)) }}
{{- end }}
{{- if eq $s.output.type "file" }}
{{- $ov := .Values.output.volume }}
{{- range list "emptyDir" "ephemeral" "hostPath" }}
{{- if hasKey $ov . }}
{{- fail (printf "%s with serve.output.type \"file\", but output.volume is %s: each pod (emptyDir, ephemeral) or node (hostPath) would get its own output directory, while the shards of one job run on any replica and one of them finishes the job from all its parts. Use a ReadWriteMany claim (with output.accessMode=ReadWriteMany) or an nfs volume, serve.output.type=s3, or serve.replicas=1." $podsText .) }}
{{- end }}
{{- end }}
{{- if and (hasKey $ov "persistentVolumeClaim") (ne .Values.output.accessMode "ReadWriteMany") }}
{{- fail (printf "%s with serve.output.type \"file\": every serve pod writes to output.volume (claim %q), on its own node, and needs it ReadWriteMany; a %s claim attaches to one node only, so pods on other nodes would hang in ContainerCreating (Multi-Attach error). If the claim is ReadWriteMany (NFS, CephFS, EFS, Filestore, ...), declare it with output.accessMode=ReadWriteMany (the chart cannot read an existing claim's access mode); otherwise use serve.output.type=s3 or serve.replicas=1." $podsText (toString $ov.persistentVolumeClaim.claimName) (toString .Values.output.accessMode)) }}
{{- end }}
{{- end }}
{{- end }}
{{- /* A writable mount inside the read-only models mount hides what the models volume holds there, and
cannot even be created when that folder is missing (the container fails to start). */}}
{{- if include "ddpm-worker.hfHomeVolume" . }}
{{- $home := trimSuffix "/" .Values.models.hfHome }}
{{- $mp := trimSuffix "/" .Values.models.mountPath }}
{{- if or (eq $home $mp) (hasPrefix (printf "%s/" $mp) $home) }}
{{- fail (printf "models.hfHome (%s) lies inside models.mountPath (%s), which is mounted read-only: the writable models.hfHomeVolume mounted there would hide what the models volume holds at that path. Choose an hfHome outside it (e.g. /var/cache/huggingface), or set models.hfHomeVolume to null to use a cache fetched into the models volume beforehand." .Values.models.hfHome .Values.models.mountPath) }}
{{- end }}
{{- end }}
{{- if and $s.networkPolicy.enabled (not $s.networkPolicy.from) }}
{{- fail "serve.networkPolicy.enabled is true but serve.networkPolicy.from is empty: an ingress rule without peers admits every source, so the policy would restrict nothing on the API port. List the peers that may call it (podSelector, namespaceSelector, ipBlock entries; [{namespaceSelector: {}}] for every pod in the cluster)." }}
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

{{/*
The environment the serve pods and the generate Job share: HF cache and token, S3 endpoint and
credentials. A YAML list ("[]" when empty).
*/}}
{{- define "ddpm-worker.sharedEnv" -}}
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
{{- with .Values.hfToken.existingSecret }}
{{- $env = append $env (dict "name" "HF_TOKEN" "valueFrom" (dict "secretKeyRef" (dict "name" . "key" $.Values.hfToken.key))) }}
{{- end }}
{{- with $aws.existingSecret }}
{{- $env = append $env (dict "name" "AWS_ACCESS_KEY_ID" "valueFrom" (dict "secretKeyRef" (dict "name" . "key" $aws.accessKeyIdKey))) }}
{{- $env = append $env (dict "name" "AWS_SECRET_ACCESS_KEY" "valueFrom" (dict "secretKeyRef" (dict "name" . "key" $aws.secretAccessKeyKey))) }}
{{- if $aws.sessionTokenKey }}
{{- $env = append $env (dict "name" "AWS_SESSION_TOKEN" "valueFrom" (dict "secretKeyRef" (dict "name" . "key" $aws.sessionTokenKey))) }}
{{- end }}
{{- end }}
{{- toYaml $env }}
{{- end }}

{{/* A container's `env:` from (list context extraEnv): the shared environment, then extraEnv. */}}
{{- define "ddpm-worker.containerEnv" -}}
{{- $env := concat (include "ddpm-worker.sharedEnv" (index . 0) | fromYamlArray) (index . 1 | default list) }}
{{- if $env }}
env:
  {{- toYaml $env | nindent 2 }}
{{- end }}
{{- end }}

{{/* The serve container's environment: the shared one, the NATS user name, tracing, and serve.extraEnv. */}}
{{- define "ddpm-worker.env" -}}
{{- $own := list }}
{{- $nats := .Values.serve.queue.nats | default dict }}
{{- if and (eq .Values.serve.queue.type "nats") ($nats.auth | default dict).userSecret }}
{{- $own = append $own (dict "name" "DDPM_NATS_USER" "valueFrom" (dict "secretKeyRef" (dict "name" $nats.auth.userSecret "key" $nats.auth.userKey))) }}
{{- end }}
{{- $own = concat $own (include "ddpm-worker.tracingEnv" . | fromYamlArray) }}
{{- include "ddpm-worker.containerEnv" (list . (concat $own (.Values.serve.extraEnv | default list))) }}
{{- end }}

{{/* True ("true") when serve needs models.volume: a model is a folder path, or a hub id read from a cache
in that volume (no writable models.hfHomeVolume). Models all on s3:// or hub ids downloaded into
hfHomeVolume need no models volume, nor its access mode. */}}
{{- define "ddpm-worker.serveModelsVolume" -}}
{{- $need := false }}
{{- range .Values.serve.models }}
{{- if hasPrefix "s3://" (toString .path) }}
{{- else if include "ddpm-worker.isHubId" .path }}
{{- if not (and $.Values.models.hfHome $.Values.models.hfHomeVolume) }}{{ $need = true }}{{ end }}
{{- else }}
{{- $need = true }}
{{- end }}
{{- end }}
{{- if $need }}true{{ end }}
{{- end }}

{{/* True ("true") when the string is a Hugging Face hub id, org/name, as ddpm-worker tells them apart. */}}
{{- define "ddpm-worker.isHubId" -}}
{{- if regexMatch "^[A-Za-z0-9_-][A-Za-z0-9._-]*/[A-Za-z0-9_-][A-Za-z0-9._-]*$" (toString .) }}true{{ end }}
{{- end }}

{{/* True ("true") when models.hfHomeVolume is mounted writable at models.hfHome in the generate Job. */}}
{{- define "ddpm-worker.generateHfHomeVolume" -}}
{{- if and .Values.models.hfHome .Values.models.hfHomeVolume (include "ddpm-worker.isHubId" .Values.generate.model) }}true{{ end }}
{{- end }}

{{/* The generate Job's batches: numSamples / batchSize, rounded up. */}}
{{- define "ddpm-worker.generateBatches" -}}
{{- $g := .Values.generate }}
{{- div (sub (add (int64 $g.numSamples) (int64 $g.batchSize)) 1) (int64 $g.batchSize) }}
{{- end }}

{{/*
Render-time checks of the generate values that the JSON schema cannot express. Fails the render with a
message that says what to change.
*/}}
{{- define "ddpm-worker.validateGenerate" -}}
{{- $g := .Values.generate }}
{{- $batches := include "ddpm-worker.generateBatches" . | int64 }}
{{- if gt (int64 $g.parts) $batches }}
{{- fail (printf "generate.parts is %d, but the run has only %d batches (numSamples %d in batches of %d): each part samples whole batches, so that every sample comes out as in one unsplit run. Use at most %d parts, or a smaller generate.batchSize." (int64 $g.parts) $batches (int64 $g.numSamples) (int64 $g.batchSize) $batches) }}
{{- end }}
{{- /* Parallel pods land on several nodes (one GPU node each, as a rule), as serve's replicas do. */}}
{{- $parallel := 1 }}
{{- if gt (int64 $g.parts) 1 }}
{{- $parallel = $g.parallelism | default $g.parts | int64 }}
{{- end }}
{{- if gt $parallel 1 }}
{{- $mv := .Values.models.volume }}
{{- if and (not (hasPrefix "s3://" (toString $g.model))) (hasKey $mv "persistentVolumeClaim") (not (has .Values.models.accessMode (list "ReadOnlyMany" "ReadWriteMany"))) }}
{{- fail (printf "generate.parts is %d with %d pods at once: every pod mounts models.volume (claim %q), on its own node. A %s claim attaches to one node only, so pods on other nodes would hang in ContainerCreating (Multi-Attach error). If the claim is ReadOnlyMany or ReadWriteMany, declare it with models.accessMode (the chart cannot read an existing claim's access mode); otherwise set generate.parallelism to 1, or load the model from s3://." (int64 $g.parts) $parallel (toString $mv.persistentVolumeClaim.claimName) (toString .Values.models.accessMode)) }}
{{- end }}
{{- if not (hasPrefix "s3://" (toString $g.output)) }}
{{- $ov := .Values.output.volume }}
{{- range list "emptyDir" "ephemeral" "hostPath" }}
{{- if hasKey $ov . }}
{{- fail (printf "generate.parts is %d with %d pods at once, writing to output.volume, which is %s: each pod (emptyDir, ephemeral) or node (hostPath) would get its own output folder, and the parts of the run must land in one. Use a ReadWriteMany claim (with output.accessMode=ReadWriteMany) or an nfs volume, generate.output=s3://..., or generate.parallelism=1." (int64 $g.parts) $parallel .) }}
{{- end }}
{{- end }}
{{- if and (hasKey $ov "persistentVolumeClaim") (ne .Values.output.accessMode "ReadWriteMany") }}
{{- fail (printf "generate.parts is %d with %d pods at once: every pod writes to output.volume (claim %q), on its own node, and needs it ReadWriteMany; a %s claim attaches to one node only, so pods on other nodes would hang in ContainerCreating (Multi-Attach error). If the claim is ReadWriteMany (NFS, CephFS, EFS, Filestore, ...), declare it with output.accessMode=ReadWriteMany (the chart cannot read an existing claim's access mode); otherwise use generate.output=s3://... or generate.parallelism=1." (int64 $g.parts) $parallel (toString $ov.persistentVolumeClaim.claimName) (toString .Values.output.accessMode)) }}
{{- end }}
{{- end }}
{{- end }}
{{- if and (ne $g.backoffLimitPerIndex nil) (le (int64 $g.parts) 1) }}
{{- fail "generate.backoffLimitPerIndex is set but generate.parts is 1: retries per index apply to an Indexed Job only (generate.parts > 1). Use generate.backoffLimit instead." }}
{{- end }}
{{- if include "ddpm-worker.generateHfHomeVolume" . }}
{{- $home := trimSuffix "/" .Values.models.hfHome }}
{{- $mp := trimSuffix "/" .Values.models.mountPath }}
{{- if or (eq $home $mp) (hasPrefix (printf "%s/" $mp) $home) }}
{{- fail (printf "models.hfHome (%s) lies inside models.mountPath (%s), which is mounted read-only: the writable models.hfHomeVolume that the generate Job's hub model (%s) needs there would hide what the models volume holds at that path. Choose an hfHome outside it (e.g. /var/cache/huggingface), or set models.hfHomeVolume to null to use a cache fetched into the models volume beforehand." .Values.models.hfHome .Values.models.mountPath $g.model) }}
{{- end }}
{{- end }}
{{- end }}

{{/* True ("true") when the serve workers are scaled by KEDA and the device-less api pods front them. */}}
{{- define "ddpm-worker.apiPods" -}}
{{- $a := .Values.serve.autoscaling | default dict }}
{{- if and $a.enabled ($a.api | default dict).enabled }}true{{ end -}}
{{- end }}

{{/* The most serve pods (workers and api pods) that can run at once: what the volumes must allow. */}}
{{- define "ddpm-worker.servePods" -}}
{{- $s := .Values.serve }}
{{- $a := $s.autoscaling | default dict }}
{{- if $a.enabled }}
{{- add (int $a.maxReplicaCount) (ternary (int $a.api.replicas) 0 (not (empty (include "ddpm-worker.apiPods" .)))) }}
{{- else }}
{{- int $s.replicas }}
{{- end }}
{{- end }}

{{/* A NATS priority as its consumer's name: p + the priority with its sign bit flipped, 8 hex digits
(as ddpm-worker names them; p80000000 for priority 0). */}}
{{- define "ddpm-worker.priorityConsumer" -}}
{{- printf "p%08x" (add (int64 .) 2147483648) }}
{{- end }}

{{/* host:port of the NATS monitoring endpoint that KEDA reads. */}}
{{- define "ddpm-worker.natsMonitoring" -}}
{{- $n := .Values.serve.queue.nats }}
{{- $a := .Values.serve.autoscaling.nats }}
{{- if $a.monitoringEndpoint }}
{{- $a.monitoringEndpoint }}
{{- else }}
{{- $hostPort := regexReplaceAll "^[a-z]+://" (first (splitList "," (toString $n.url))) "" }}
{{- $host := regexReplaceAll ":[0-9]+$" $hostPort "" }}
{{- printf "%s:8222" $host }}
{{- end }}
{{- end }}

{{/*
Render-time checks of serve.autoscaling: KEDA needs the shared NATS queue, owns the worker count, and a
prometheus trigger must have something that reports the queue while the workers are at zero. (Without
KEDA's CRDs in the cluster, installing the ScaledObject fails with helm's own "no matches for kind".)
*/}}
{{- define "ddpm-worker.validateAutoscaling" -}}
{{- $s := .Values.serve }}
{{- $a := $s.autoscaling | default dict }}
{{- if $a.enabled }}
{{- if ne $s.queue.type "nats" }}
{{- fail (printf "serve.autoscaling.enabled is true but serve.queue.type is %q: the SQLite queue is one file that exactly one serve pod may open, so there is nothing to scale. Use serve.queue.type=nats, or turn autoscaling off." (toString $s.queue.type)) }}
{{- end }}
{{- if ne (int $s.replicas) 1 }}
{{- fail (printf "serve.replicas is %d but serve.autoscaling.enabled is true: KEDA sets the number of workers (serve.autoscaling.minReplicaCount to maxReplicaCount) and the Deployment carries no replica count. Leave serve.replicas at 1 (unused), or turn autoscaling off (to stop the service: serve.enabled=false, or KEDA's autoscaling.keda.sh/paused-replicas annotation)." (int $s.replicas)) }}
{{- end }}
{{- if gt (int $a.minReplicaCount) (int $a.maxReplicaCount) }}
{{- fail (printf "serve.autoscaling.minReplicaCount (%d) is greater than maxReplicaCount (%d)." (int $a.minReplicaCount) (int $a.maxReplicaCount)) }}
{{- end }}
{{- if eq $a.trigger "prometheus" }}
{{- if not $a.prometheus.serverAddress }}
{{- fail "serve.autoscaling.trigger is \"prometheus\" but serve.autoscaling.prometheus.serverAddress is empty: set the Prometheus URL KEDA queries, e.g. http://prometheus-operated.monitoring.svc:9090." }}
{{- end }}
{{- if not $s.metrics.enabled }}
{{- fail "serve.autoscaling.trigger is \"prometheus\" but serve.metrics.enabled is false: nothing would report ddpm_queue_shards." }}
{{- end }}
{{- /* The query reads ddpm_queue_shards from running serve pods. With no api pods and no workers nobody
reports it: the queue looks empty forever, and the workers never wake. */}}
{{- if and (eq (int $a.minReplicaCount) 0) (not (include "ddpm-worker.apiPods" .)) }}
{{- fail "serve.autoscaling.trigger is \"prometheus\" with minReplicaCount 0 and serve.autoscaling.api.enabled false: at zero workers no pod reports ddpm_queue_shards, so Prometheus cannot see queued work and the workers would never be woken. Enable the api pods (they report the queue), set minReplicaCount to 1 or more, or use trigger \"nats\" (read from the NATS server itself)." }}
{{- end }}
{{- else }}
{{- $lo := int $s.minPriority }}
{{- $hi := int $s.maxPriority }}
{{- range $a.nats.priorities }}
{{- if or (lt (int .) $lo) (gt (int .) $hi) }}
{{- fail (printf "serve.autoscaling.nats.priorities has %v, outside serve.minPriority..serve.maxPriority (%d..%d): no job can have it." . $lo $hi) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* The serve flags of the NATS connection's TLS and credentials (files mounted by natsVolumeMounts). */}}
{{- define "ddpm-worker.natsArgs" -}}
{{- $n := .Values.serve.queue.nats }}
{{- $auth := $n.auth | default dict }}
{{- $tls := $n.tls | default dict }}
{{- with $auth.credsSecret }}
- --nats-creds=/etc/ddpm-worker/nats-creds/{{ $auth.credsKey }}
{{- end }}
{{- with $auth.userSecret }}
- --nats-password-file=/etc/ddpm-worker/nats-password/{{ $auth.passwordKey }}
{{- end }}
{{- with $auth.tokenSecret }}
- --nats-token-file=/etc/ddpm-worker/nats-token/{{ $auth.tokenKey }}
{{- end }}
{{- with $tls.caSecret }}
- --nats-ca=/etc/ddpm-worker/nats-ca/{{ $tls.caKey }}
{{- end }}
{{- with $tls.clientCertSecret }}
- --nats-cert=/etc/ddpm-worker/nats-client/tls.crt
- --nats-key=/etc/ddpm-worker/nats-client/tls.key
{{- end }}
{{- end }}

{{/* (name, mount path, Secret, key or "" for the whole Secret) of each NATS Secret in use, as YAML. */}}
{{- define "ddpm-worker.natsSecrets" -}}
{{- $n := .Values.serve.queue.nats }}
{{- $auth := $n.auth | default dict }}
{{- $tls := $n.tls | default dict }}
{{- $out := list }}
{{- with $auth.credsSecret }}{{ $out = append $out (list "nats-creds" . $auth.credsKey) }}{{ end }}
{{- with $auth.userSecret }}{{ $out = append $out (list "nats-password" . $auth.passwordKey) }}{{ end }}
{{- with $auth.tokenSecret }}{{ $out = append $out (list "nats-token" . $auth.tokenKey) }}{{ end }}
{{- with $tls.caSecret }}{{ $out = append $out (list "nats-ca" . $tls.caKey) }}{{ end }}
{{- with $tls.clientCertSecret }}{{ $out = append $out (list "nats-client" . "") }}{{ end }}
{{- toYaml $out }}
{{- end }}

{{/* Read-only directory mounts of the NATS Secrets (no subPath: a rotated Secret reaches the pod). */}}
{{- define "ddpm-worker.natsVolumeMounts" -}}
{{- if eq .Values.serve.queue.type "nats" }}
{{- range fromYamlArray (include "ddpm-worker.natsSecrets" .) }}
- name: {{ index . 0 }}
  mountPath: /etc/ddpm-worker/{{ index . 0 }}
  readOnly: true
{{- end }}
{{- end }}
{{- end }}

{{- define "ddpm-worker.natsVolumes" -}}
{{- if eq .Values.serve.queue.type "nats" }}
{{- range fromYamlArray (include "ddpm-worker.natsSecrets" .) }}
- name: {{ index . 0 }}
  secret:
    secretName: {{ index . 1 }}
    {{- with index . 2 }}
    items:
      - key: {{ . }}
        path: {{ . }}
    {{- end }}
{{- end }}
{{- end }}
{{- end }}
