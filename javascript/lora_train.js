// LoRA Train tab: while a job runs, click the hidden Refresh button every 2 s so the status, loss plot and
// samples update. Works with gradio 3.41 (A1111) and 4.x (Forge): it only reads the DOM and clicks a button.
(function () {
    "use strict";

    var PERIOD_MS = 2000;
    var root = function () {
        return typeof gradioApp === "function" ? gradioApp() : document;
    };

    function status() {
        var box = root().querySelector("#lora_train_status .lora_train_status_box");
        return box ? box.getAttribute("data-status") : null;
    }

    function click(id) {
        var button = root().querySelector("#" + id);
        if (button) {
            button.click();
        }
    }

    function refresh() {
        click("lora_train_refresh");
    }

    var primed = false;
    function tick() {
        if (!primed && root().querySelector("#lora_train_refresh")) {
            primed = true; // a page just opened shows the job that runs or ran last, with its settings
            refresh();
            click("lora_train_show_job");
        } else if (status() === "running") {
            refresh();
        }
    }

    function begin() {
        setInterval(tick, PERIOD_MS);
    }

    if (typeof onUiLoaded === "function") {
        onUiLoaded(begin);
    } else if (document.readyState === "loading") {
        document.addEventListener("DOMContentLoaded", begin);
    } else {
        begin();
    }
})();
