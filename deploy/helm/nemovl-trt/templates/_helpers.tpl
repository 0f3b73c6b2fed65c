{{/* Names and labels. */}}
{{- define "nemovl-trt.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "nemovl-trt.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "nemovl-trt.selectorLabels" -}}
app.kubernetes.io/name: {{ include "nemovl-trt.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "nemovl-trt.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "nemovl-trt.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
nemovl.dev/target: {{ .Values.target | quote }}
{{- end -}}

{{- define "nemovl-trt.claimName" -}}
{{- default (printf "%s-model-cache" (include "nemovl-trt.fullname" .)) .Values.persistence.existingClaim -}}
{{- end -}}

{{/* Settings that cannot work together: one-line errors at render time. */}}
{{- define "nemovl-trt.validate" -}}
{{- $v := .Values -}}
{{- if le (int $v.terminationGracePeriodSeconds) (int $v.serve.shutdownGraceSeconds) -}}
{{- fail (printf "terminationGracePeriodSeconds (%v) must exceed serve.shutdownGraceSeconds (%v): the kubelet would kill in-flight requests" $v.terminationGracePeriodSeconds $v.serve.shutdownGraceSeconds) -}}
{{- end -}}
{{- $window := mul (int $v.probes.startup.periodSeconds) (int $v.probes.startup.failureThreshold) -}}
{{- if and $v.engines.build (ge (int $v.engines.waitForCheckpointSeconds) (int $window)) -}}
{{- fail (printf "engines.waitForCheckpointSeconds (%v) must be below the startupProbe window (%v s): the pod would be killed while waiting" $v.engines.waitForCheckpointSeconds $window) -}}
{{- end -}}
{{- $many := or (gt (int $v.replicaCount) 1) $v.autoscaling.enabled -}}
{{- if and $many $v.persistence.enabled (not $v.persistence.existingClaim) (not (has "ReadWriteMany" $v.persistence.accessModes)) -}}
{{- fail "persistence.accessModes must include ReadWriteMany when replicaCount > 1 or autoscaling.enabled (every pod mounts the model cache); or set persistence.existingClaim" -}}
{{- end -}}
{{- if and $v.autoscaling.enabled (lt (int $v.autoscaling.maxReplicas) (int $v.autoscaling.minReplicas)) -}}
{{- fail (printf "autoscaling.maxReplicas (%v) is below autoscaling.minReplicas (%v)" $v.autoscaling.maxReplicas $v.autoscaling.minReplicas) -}}
{{- end -}}
{{- if and (eq (int $v.gpus) 0) (ne $v.target "cpu") -}}
{{- fail (printf "target %s is a GPU target: gpus must be at least 1" $v.target) -}}
{{- end -}}
{{- $tpp := mul (int $v.parallel.tensorParallel) (int $v.parallel.pipelineParallel) -}}
{{- if and (gt (int $v.gpus) 0) (ne (int $v.gpus) (int $tpp)) -}}
{{- fail (printf "gpus (%v) must equal parallel.tensorParallel x parallel.pipelineParallel (%v): one pod holds all ranks of one engine" $v.gpus $tpp) -}}
{{- end -}}
{{- if and (gt (int $v.gpus) 0) (eq $v.target "cpu") -}}
{{- fail "target cpu runs on the CPU: set gpus: 0" -}}
{{- end -}}
{{- end -}}
