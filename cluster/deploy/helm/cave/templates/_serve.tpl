{{/* serveConfigV2: config/serve.yaml for production (as cluster/deploy/serve.yaml): no
BKG_DB_PATH, the secrets read from the files of the head's secret volume (the *_FILE settings:
paths, not values, so no secret is in Ray's environment or in this config), ApiIngress held on
the head (Ray's node:__internal_head__ resource; only the head pod mounts the secrets) and
autoscaled. */}}
{{- define "cave.serveConfig" -}}
{{- $secrets := include "cave.secretsDir" . -}}
{{- $env := dict
    "CAVE_ENV" "production"
    "CAVE_SECRETS_DIR" "/var/lib/cave/secrets"
    "CAVE_AUDIT_LOG_ENABLED" "true"
    "CAVE_AUDIT_LOG_PATH" "/var/log/cave/audit.jsonl"
    "CAVE_OTEL_SAMPLING_RATE" (toString .Values.otel_sampling_rate)
    "BKG_DB_DSN_FILE" (printf "%s/db-dsn" $secrets)
    "CAVE_KEY_PEPPER_FILE" (printf "%s/key-pepper" $secrets)
    "CAVE_SECRET_KEY_FILE" (printf "%s/secret-key" $secrets)
    "CAVE_AUDIT_LOG_HMAC_KEY_FILE" (printf "%s/audit-hmac-key" $secrets) -}}
{{- if .Values.authSecret.rotationWebhookSecretKey }}
{{- $_ := set $env "CAVE_ROTATION_WEBHOOK_SECRET_FILE" (printf "%s/rotation-webhook-secret" $secrets) }}
{{- end }}
{{- range $name, $value := .Values.env }}
{{- $_ := set $env $name (toString $value) }}
{{- end }}
{{- $args := dict "env" $env -}}
{{- with .Values.models }}
{{- $_ := set $args "models" . }}
{{- end }}
{{- $ingress := dict
    "name" "ApiIngress"
    "max_ongoing_requests" .Values.api.max_ongoing_requests
    "ray_actor_options" (dict "num_cpus" 0 "resources" (dict "node:__internal_head__" 0.001))
    "autoscaling_config" .Values.api.autoscaling_config -}}
{{- $app := dict
    "name" "cave"
    "route_prefix" "/"
    "import_path" "deployments.http.app:build_app"
    "args" $args
    "deployments" (list $ingress) -}}
{{- $config := dict
    "proxy_location" "EveryNode"
    "http_options" (dict "host" "0.0.0.0" "port" 8000)
    "applications" (list $app) -}}
{{- toYaml $config -}}
{{- end -}}
