// /docs: Swagger UI from the package (ui/swagger-ui/, see its VERSION and LICENSE), reading this
// service's /openapi.json. Nothing is loaded from anywhere else, so the page works offline.
"use strict";

document.addEventListener("DOMContentLoaded", () => {
  window.ui = SwaggerUIBundle({
    url: "/openapi.json",
    dom_id: "#swagger-ui",
    layout: "BaseLayout",
    deepLinking: true,
    showExtensions: true,
    showCommonExtensions: true,
    validatorUrl: null, // the default asks a public validator service
    presets: [SwaggerUIBundle.presets.apis],
  });
});
