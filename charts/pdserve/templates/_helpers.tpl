{{/* Names and labels. */}}
{{- define "pdserve.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The release's full name; kept short because role and Service suffixes follow it. */}}
{{- define "pdserve.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "pdserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pdserve.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "pdserve.labels" -}}
{{ include "pdserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: pdserve
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "pdserve.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "pdserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "pdserve.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Worker roles this release runs, as a JSON list (fromJsonArray). */}}
{{- define "pdserve.roles" -}}
{{- if eq .Values.mode "colocated" -}}["colocated"]{{- else -}}["prefill","decode"]{{- end -}}
{{- end -}}

{{/* The headless Service the orchestrator resolves for a worker role: one A record per
ready pod (per group leader for multi-host roles). Its name differs from the workload's
because a LeaderWorkerSet creates its own headless Service under the workload's name. */}}
{{- define "pdserve.workerServiceName" -}}
{{- printf "%s-%s-headless" (include "pdserve.fullname" .root) .role -}}
{{- end -}}

{{/* NAME:PORT the orchestrator's --ROLE-dns flag gets. */}}
{{- define "pdserve.workerDnsName" -}}
{{- $cfg := index .root.Values .role -}}
{{- printf "%s.%s.svc.%s:%d" (include "pdserve.workerServiceName" .) .root.Release.Namespace .root.Values.clusterDomain (int $cfg.port) -}}
{{- end -}}

{{/* Chips in a TPU topology such as 2x2x4. */}}
{{- define "pdserve.topologyChips" -}}
{{- $chips := 1 -}}
{{- range splitList "x" . -}}{{- $chips = mul $chips (atoi .) -}}{{- end -}}
{{- $chips -}}
{{- end -}}

{{- define "pdserve.isMultiHost" -}}
{{- if and .tpu.enabled (gt (int .tpu.hosts) 1) -}}true{{- end -}}
{{- end -}}

{{/* A probe's failureThreshold for a time budget at a period (rounded up). */}}
{{- define "pdserve.budgetThreshold" -}}
{{- max 1 (div (add .budget .period -1) .period) -}}
{{- end -}}

{{- define "pdserve.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.security.runAsUser }}
runAsGroup: {{ .Values.security.runAsGroup }}
fsGroup: {{ .Values.security.fsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* TPU access needs no privileged mode on GKE 1.28+: the device plugin hands the
container its /dev/vfio devices. */}}
{{- define "pdserve.containerSecurityContext" -}}
runAsNonRoot: true
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
{{- end -}}

{{/* Volumes every pod mounts: a writable /tmp (the root filesystem is read-only, and
JAX, XLA and libtpu write caches and logs there) and the model, when it is not a preset. */}}
{{- define "pdserve.volumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.security.tmpSizeLimit }}
{{- if eq .Values.model.source "pvc" }}
- name: model
  persistentVolumeClaim:
    claimName: {{ .Values.model.volume.pvc.claimName }}
    readOnly: true
{{- else if eq .Values.model.source "gcsFuse" }}
- name: model
  csi:
    driver: gcsfuse.csi.storage.gke.io
    readOnly: true
    volumeAttributes:
      bucketName: {{ .Values.model.volume.gcsFuse.bucket }}
      mountOptions: {{ .Values.model.volume.gcsFuse.mountOptions | quote }}
{{- end }}
{{- end -}}

{{- define "pdserve.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
{{- if ne .Values.model.source "preset" }}
- name: model
  mountPath: {{ .Values.model.volume.mountPath }}
  readOnly: true
{{- end }}
{{- end -}}

{{/* Pod annotations as YAML (a map). The GCS FUSE CSI driver injects its sidecar only
into pods annotated so. */}}
{{- define "pdserve.podAnnotations" -}}
{{- $out := dict -}}
{{- if eq .root.Values.model.source "gcsFuse" -}}
{{- $_ := set $out "gke-gcsfuse/volumes" "true" -}}
{{- end -}}
{{- toYaml (merge $out (.extra | default dict)) -}}
{{- end -}}

{{/* gRPC probes on grpc.health.v1. Kubernetes' grpc probe takes only a numeric port.
The worker starts its gRPC server (and so its health service) only after it has loaded
weights and compiled, so the startup probe carries that budget and liveness starts after it. */}}
{{- define "pdserve.probes" -}}
startupProbe:
  grpc:
    port: {{ .port }}
  periodSeconds: 10
  timeoutSeconds: 5
  failureThreshold: {{ include "pdserve.budgetThreshold" (dict "budget" (int .startupBudgetSeconds) "period" 10) }}
livenessProbe:
  grpc:
    port: {{ .port }}
  periodSeconds: 10
  timeoutSeconds: 5
  failureThreshold: 3
readinessProbe:
  {{- if .httpPort }}
  # The HTTP API's own health (503 while draining), so that a pod whose HTTP server is
  # not serving leaves the Service too.
  httpGet:
    path: /health
    port: {{ .httpPort }}
    scheme: {{ .httpScheme | default "HTTP" }}
  {{- else }}
  grpc:
    port: {{ .port }}
  {{- end }}
  periodSeconds: 5
  timeoutSeconds: 5
  failureThreshold: 2
{{- end -}}

{{/* Container args of a worker role (after the `pdserve` entrypoint). Each flag goes only
to the roles that read it (FLAGS.md; a role's parser refuses any other): decode slots and
the decode KV pool to decode and colocated, the prompt queue and chunked prefill to
prefill and colocated. */}}
{{- define "pdserve.workerArgs" -}}
{{- $v := .root.Values -}}
{{- $cfg := .cfg -}}
{{- $decoding := has .role (list "decode" "colocated") -}}
{{- $prefilling := has .role (list "prefill" "colocated") -}}
{{- if eq .role "colocated" }}
- worker
- --role
- colocated
{{- else }}
- {{ .role }}
{{- end }}
- --model
- {{ $v.model.path | quote }}
- --dtype
- {{ $v.model.dtype }}
- --quantize
- {{ $v.model.quantize }}
- --port
- {{ $cfg.port | quote }}
- --metrics-port
- {{ $cfg.metricsPort | quote }}
{{- /* Every chip of the host: the model is sharded over them (CPU pods: one device). */}}
- --tensor-parallel
- {{ ternary (int $cfg.tpu.chipsPerHost) 1 $cfg.tpu.enabled | quote }}
- --max-seq-len
- {{ $cfg.maxSeqLen | quote }}
- --prefill-buckets
- {{ join "," $cfg.prefillBuckets | quote }}
- --page-size
- {{ $v.kvCache.pageSize | quote }}
{{- if hasKey $cfg "kvMemoryFraction" }}
- --kv-memory-fraction
- {{ $cfg.kvMemoryFraction | quote }}
{{- end }}
{{- if hasKey $cfg "memoryHeadroomMiB" }}
- --memory-headroom-mib
- {{ $cfg.memoryHeadroomMiB | quote }}
{{- end }}
{{- if $decoding }}
- --slots
- {{ $cfg.slots | quote }}
- --kv-pages
- {{ $cfg.kvPages | quote }}
- --attention
- {{ $cfg.attention | quote }}
- --max-kv-mib
- {{ $cfg.maxKvMiB | quote }}
{{- end }}
{{- if $prefilling }}
- --max-queue
- {{ $cfg.maxQueue | quote }}
{{- /* Chunked, packed prefill and the prefix cache (README "Chunked prefill"). */}}
{{- with $cfg.chunkedPrefill }}
{{- if .chunk }}
- --prefill-chunk
- {{ .chunk | quote }}
{{- end }}
- --prefill-max-rows
- {{ .maxRows | quote }}
- --prefix-cache-mib
- {{ .prefixCacheMiB | quote }}
- --prefill-aging-s
- {{ .agingS | quote }}
{{- end }}
{{- end }}
{{- if and $decoding $prefilling }}
- --colocated-prefill
- {{ $cfg.prefill | quote }}
- --batch-tokens
- {{ $cfg.batchTokens | quote }}
{{- end }}
- --drain-grace-s
- {{ $cfg.drainGraceS | quote }}
{{- if $v.compilationCache.enabled }}
- --compilation-cache-dir
- {{ $v.compilationCache.mountPath | quote }}
{{- end }}
{{ include "pdserve.connectionArgs" (dict "root" .root "tls" $v.tls.internal.enabled "healthPort" $cfg.healthPort) }}
{{- if $v.tls.internal.enabled }}
{{ include "pdserve.internalTlsArgs" (dict "root" .root "flag" "--tls") }}
{{- end }}
{{- range $cfg.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end -}}

{{/* One worker pod template (Deployment template, or an LWS leader/worker template).
Every pod of a multi-host group runs the same program (JAX's multi-host model); only
leaders carry the `pdserve.dev/serving: "true"` label the headless Service selects. */}}
{{- define "pdserve.workerPodTemplate" -}}
{{- $root := .root -}}
{{- $v := $root.Values -}}
{{- $cfg := .cfg -}}
{{- $ctx := dict "root" $root "component" .role -}}
metadata:
  labels:
    {{- include "pdserve.labels" $ctx | nindent 4 }}
    pdserve.dev/serving: {{ .serving | quote }}
  {{- with include "pdserve.podAnnotations" (dict "root" $root "extra" $cfg.podAnnotations) | fromYaml }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  serviceAccountName: {{ include "pdserve.serviceAccountName" $root }}
  {{- with $v.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  terminationGracePeriodSeconds: {{ add (int $cfg.drainGraceS) (int $cfg.terminationGraceMarginSeconds) }}
  securityContext:
    {{- include "pdserve.podSecurityContext" $root | nindent 4 }}
  {{- $nodeSelector := $cfg.nodeSelector | default dict }}
  {{- if $cfg.tpu.enabled }}
  {{- $nodeSelector = merge (dict "cloud.google.com/gke-tpu-accelerator" $cfg.tpu.accelerator "cloud.google.com/gke-tpu-topology" $cfg.tpu.topology) $nodeSelector }}
  {{- end }}
  {{- with $nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- $tolerations := $cfg.tolerations | default list }}
  {{- if $cfg.tpu.enabled }}
  {{- $tolerations = prepend $tolerations (dict "key" "google.com/tpu" "operator" "Exists" "effect" "NoSchedule") }}
  {{- end }}
  {{- with $tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $cfg.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: {{ .role }}
      image: {{ include "pdserve.image" $root }}
      imagePullPolicy: {{ $v.image.pullPolicy }}
      args:
        {{- include "pdserve.workerArgs" . | trim | nindent 8 }}
      env:
        # JAX picks its backend once; naming it avoids probing for devices that are absent.
        - name: JAX_PLATFORMS
          value: {{ ternary "tpu" "cpu" $cfg.tpu.enabled }}
        - name: HOME
          value: /tmp
        {{- with $cfg.env }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      ports:
        - name: grpc
          containerPort: {{ $cfg.port }}
          protocol: TCP
        - name: metrics
          containerPort: {{ $cfg.metricsPort }}
          protocol: TCP
        {{- if $v.tls.internal.enabled }}
        - name: health
          containerPort: {{ $cfg.healthPort }}
          protocol: TCP
        {{- end }}
      {{- $probePort := ternary $cfg.healthPort $cfg.port $v.tls.internal.enabled }}
      {{- include "pdserve.probes" (dict "port" $probePort "startupBudgetSeconds" $cfg.startupBudgetSeconds) | nindent 6 }}
      {{- $resources := deepCopy ($cfg.resources | default dict) }}
      {{- if $cfg.tpu.enabled }}
      {{- $requests := merge (dict "google.com/tpu" (int $cfg.tpu.chipsPerHost)) ($resources.requests | default dict) }}
      {{- $limits := merge (dict "google.com/tpu" (int $cfg.tpu.chipsPerHost)) ($resources.limits | default dict) }}
      {{- $resources = dict "requests" $requests "limits" $limits }}
      {{- end }}
      {{- with $resources }}
      resources:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- include "pdserve.containerSecurityContext" $root | nindent 8 }}
      volumeMounts:
        {{- include "pdserve.volumeMounts" $root | nindent 8 }}
        {{- if $v.compilationCache.enabled }}
        - name: compilation-cache
          mountPath: {{ $v.compilationCache.mountPath }}
        {{- end }}
        {{- if $v.tls.internal.enabled }}
        {{- include "pdserve.internalTlsMount" $root | nindent 8 }}
        {{- end }}
  volumes:
    {{- include "pdserve.volumes" $root | nindent 4 }}
    {{- with $v.compilationCache }}
    {{- if .enabled }}
    - name: compilation-cache
      {{- if .pvc.claimName }}
      persistentVolumeClaim:
        claimName: {{ .pvc.claimName }}
      {{- else }}
      emptyDir:
        sizeLimit: {{ .sizeLimit }}
      {{- end }}
    {{- end }}
    {{- end }}
    {{- if $v.tls.internal.enabled }}
    {{- include "pdserve.internalTlsVolume" (dict "root" $root "component" .role) | nindent 4 }}
    {{- end }}
{{- end -}}

{{/* TLS: where each Secret is mounted (read-only, whole directory: no subPath, so the
kubelet's atomic updates reach the pod and pdserve re-reads the files). */}}
{{- define "pdserve.internalTlsDir" -}}/var/run/secrets/pdserve/internal-tls{{- end -}}
{{- define "pdserve.publicTlsDir" -}}/var/run/secrets/pdserve/public-tls{{- end -}}
{{- define "pdserve.clientCaDir" -}}/var/run/secrets/pdserve/client-ca{{- end -}}

{{/* The DNS name every component's internal certificate carries (clients verify it). */}}
{{- define "pdserve.internalServerName" -}}
{{- default (printf "%s-internal.%s.svc" (include "pdserve.fullname" .) .Release.Namespace) .Values.tls.internal.serverName -}}
{{- end -}}

{{/* The Secret holding a component's internal certificate (tls.crt, tls.key, ca.crt). */}}
{{- define "pdserve.internalTlsSecret" -}}
{{- $t := .root.Values.tls.internal -}}
{{- if $t.certManager.enabled -}}
{{- printf "%s-%s-internal-tls" (include "pdserve.fullname" .root) .component -}}
{{- else -}}
{{- index $t.existingSecrets .component -}}
{{- end -}}
{{- end -}}

{{- define "pdserve.publicTlsSecret" -}}
{{- if .Values.tls.public.certManager.enabled -}}
{{- printf "%s-public-tls" (include "pdserve.fullname" .) -}}
{{- else -}}
{{- .Values.tls.public.existingSecret -}}
{{- end -}}
{{- end -}}

{{/* Connection flags every server takes. */}}
{{- define "pdserve.connectionArgs" -}}
{{- $c := .root.Values.connections -}}
- --keepalive-time-s
- {{ $c.keepaliveTimeS | quote }}
- --keepalive-timeout-s
- {{ $c.keepaliveTimeoutS | quote }}
- --max-connection-age-s
- {{ $c.maxConnectionAgeS | quote }}
- --max-connection-age-grace-s
- {{ $c.maxConnectionAgeGraceS | quote }}
{{- if .tls }}
- --health-port
- {{ .healthPort | quote }}
{{- end }}
{{- end -}}

{{/* A worker's mTLS flags (its certificate, its key, the internal CA, the name). */}}
{{- define "pdserve.internalTlsArgs" -}}
{{- $dir := include "pdserve.internalTlsDir" . -}}
- {{ .flag }}-cert
- {{ printf "%s/tls.crt" $dir }}
- {{ .flag }}-key
- {{ printf "%s/tls.key" $dir }}
- {{ .flag }}-ca
- {{ printf "%s/ca.crt" $dir }}
- {{ .flag }}-server-name
- {{ include "pdserve.internalServerName" .root }}
{{- end -}}

{{- define "pdserve.internalTlsVolume" -}}
- name: internal-tls
  secret:
    secretName: {{ include "pdserve.internalTlsSecret" . }}
    defaultMode: 0440
{{- end -}}

{{- define "pdserve.internalTlsMount" -}}
- name: internal-tls
  mountPath: {{ include "pdserve.internalTlsDir" . }}
  readOnly: true
{{- end -}}
