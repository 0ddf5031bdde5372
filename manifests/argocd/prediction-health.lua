-- Argo CD health check for whisperx.io/Prediction (argocd-cm key
-- resource.customizations.health.whisperx.io_Prediction). Argo CD runs it as Lua 5.1
-- with the object in `obj`; it returns {status, message}.
--   starting, processing, no status yet -> Progressing
--   succeeded                           -> Healthy
--   failed                              -> Degraded
--   canceled                            -> Suspended: stopped on purpose, so not a fault
--     (Degraded would mark the application broken for a deliberate act), but it has no
--     output, so not Healthy either.
local hs = {}

local function condition(kind)
  if obj.status == nil or obj.status.conditions == nil then
    return nil
  end
  for _, c in ipairs(obj.status.conditions) do
    if c.type == kind then
      return c
    end
  end
  return nil
end

local function nonempty(s)
  return s ~= nil and s ~= ""
end

-- The condition's message, else its reason, else `fallback`.
local function explain(kind, fallback)
  local c = condition(kind)
  if c ~= nil and nonempty(c.message) then
    return c.message
  end
  if c ~= nil and nonempty(c.reason) then
    return c.reason
  end
  return fallback
end

local function cancel_requested()
  if obj.spec ~= nil and obj.spec.cancel == true then
    return true
  end
  local annotations = obj.metadata ~= nil and obj.metadata.annotations or nil
  return annotations ~= nil and annotations["whisperx.io/cancel"] == "true"
end

local phase = nil
if obj.status ~= nil then
  phase = obj.status.phase
end

if phase == nil or phase == "" then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to accept the prediction"
elseif phase == "succeeded" then
  hs.status = "Healthy"
  hs.message = explain("Succeeded", "Prediction succeeded")
elseif phase == "failed" then
  hs.status = "Degraded"
  local message = explain("Failed", nil)
  if message == nil and nonempty(obj.status.error) then
    message = obj.status.error
  end
  if message == nil and nonempty(obj.status.reason) then
    message = obj.status.reason
  end
  hs.message = message or "Prediction failed"
elseif phase == "canceled" then
  hs.status = "Suspended"
  hs.message = explain("Canceled", "Prediction canceled")
elseif phase == "starting" or phase == "processing" then
  hs.status = "Progressing"
  if cancel_requested() then
    hs.message = "Cancellation requested"
  elseif phase == "starting" then
    hs.message = explain("Queued", "Starting")
  else
    hs.message = explain("Running", "Processing")
  end
else
  hs.status = "Unknown"
  hs.message = "Unknown phase: " .. tostring(phase)
end
return hs
