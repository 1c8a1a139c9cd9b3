{{/* The OTEL_* variables of serve from tracing.*, as a YAML list: none while tracing.otlpEndpoint is
empty (ddpm-worker exports no traces without an endpoint). */}}
{{- define "ddpm-worker.tracingEnv" -}}
{{- $t := .Values.tracing }}
{{- $env := list }}
{{- if $t.otlpEndpoint }}
{{- $env = append $env (dict "name" "OTEL_EXPORTER_OTLP_ENDPOINT" "value" $t.otlpEndpoint) }}
{{- with $t.serviceName }}
{{- $env = append $env (dict "name" "OTEL_SERVICE_NAME" "value" .) }}
{{- end }}
{{- if ne $t.samplerRatio nil }}
{{- $env = append $env (dict "name" "OTEL_TRACES_SAMPLER" "value" "parentbased_traceidratio") }}
{{- $env = append $env (dict "name" "OTEL_TRACES_SAMPLER_ARG" "value" (toString $t.samplerRatio)) }}
{{- end }}
{{- end }}
{{- toYaml $env }}
{{- end }}
